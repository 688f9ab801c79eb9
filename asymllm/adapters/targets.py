"""Which linear layers an adapter goes into, by architecture."""

from __future__ import annotations

import difflib

import torch

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3's layout: q, k and v in one matrix, gate and up in another
FUSED_LIKE = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
FUSED = {"qkv_proj": "q, k and v", "gate_up_proj": "gate and up"}

# peft's name for "every linear layer but the output head"; resolved here to leaf names so
# the log, adapter_config.json and the resume check all see the same explicit list.
ALL_LINEAR = "all-linear"

# The default is read from the model's own layer names, not from a list of model types: every
# decoder whose projections are named like Llama's (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3,
# SmolLM2, ...) gets all seven, and Phi-3's fused layout its four.
DEFAULT_LAYOUTS = (LLAMA_LIKE, FUSED_LIKE)


class TargetError(ValueError):
    """Target modules that cannot be resolved for this model."""


def default_targets(model: torch.nn.Module) -> list[str]:
    """The attention and MLP projections of every block, by the layer names the model has."""
    available = set(linear_leaf_names(model))
    for layout in DEFAULT_LAYOUTS:
        if set(layout) <= available:
            return list(layout)
    raise TargetError(
        f"this {_model_type(model)} model has no default target modules: its linear layers {sorted(available)} are named "
        f"neither like Llama's ({', '.join(LLAMA_LIKE)}) nor like Phi-3's ({', '.join(FUSED_LIKE)}); pass "
        f"--target_modules with the names to adapt, or --target_modules {ALL_LINEAR}"
    )


def fused_targets_note(targets) -> str | None:
    """What adapting a fused projection means, for the log (None when no target is fused)."""
    fused = [name for name in targets if name in FUSED] if isinstance(targets, (list, tuple, set)) else []
    if not fused:
        return None
    held = "; ".join(f"{name} holds {FUSED[name]}" for name in fused)
    return (f"fused projections ({held}): one adapter per fused matrix, so rank r is shared by the projections it "
            "holds; the V and U inits are the SVD of the whole fused matrix, and a frozen A is one r x d_in matrix "
            "for all of them (their input is the same)")


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers

    return (torch.nn.Linear, Conv1D)


def linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Last name component of every linear layer peft can adapt, e.g. 'q_proj'; the output head excluded."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, _linear_types())}
    names.discard("lm_head")
    return sorted(names)


def all_linear_targets(model: torch.nn.Module) -> list[str]:
    """`all-linear`: the leaf names of every linear layer inside the transformer blocks (the
    classes transformers keeps whole, `_no_split_modules`), never the output head; a model
    without that list gets every linear layer but the head, as peft does."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes] or [model]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head} | {"lm_head"}
    names = {name.rsplit(".", 1)[-1] for block in blocks for name, module in block.named_modules()
             if isinstance(module, _linear_types()) and module is not head}
    # peft matches leaf names anywhere in the model, so a name the head shares would adapt it too
    names -= head_names
    if not names:
        raise TargetError(f"target_modules {ALL_LINEAR!r}: this {_model_type(model)} model has no linear layer in its "
                          "transformer blocks; name the modules to adapt instead")
    return sorted(names)


def _model_type(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def resolve_targets(model: torch.nn.Module, target_modules) -> list[str] | str:
    """Explicit targets win; else the architecture's defaults. A list is checked against
    the model's linear layers so a typo is an error here, not an empty adapter;
    `all-linear` becomes the list of the transformer blocks' linear layers."""
    model_type = _model_type(model)
    targets = target_modules if target_modules else default_targets(model)
    if is_all_linear(targets):
        return all_linear_targets(model)
    if isinstance(targets, str):
        return targets  # a regex: peft matches it against full names
    available = linear_leaf_names(model)
    missing = [t for t in targets if t not in available and not _matches_full_name(model, t)]
    if len(missing) == len(targets):
        hints = {t: difflib.get_close_matches(t, available, n=1) for t in missing}
        hint = "; ".join(f"{t!r} -> did you mean {h[0]!r}?" for t, h in hints.items() if h)
        raise TargetError(
            f"none of target_modules {targets} matched a linear layer of this {model_type} model; "
            f"its linear layers are {available}" + (f" ({hint})" if hint else "")
        )
    return list(targets)


def is_all_linear(target_modules) -> bool:
    """`all-linear` given alone, as a string or a one-element list (`--target_modules all-linear`)."""
    if target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, (list, tuple)) and ALL_LINEAR in target_modules:
        if len(target_modules) > 1:
            raise TargetError(f"target_modules {list(target_modules)}: {ALL_LINEAR!r} already means every linear layer "
                              "of the transformer blocks; give it alone, or list the modules instead")
        return True
    return False


def _matches_full_name(model: torch.nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())
