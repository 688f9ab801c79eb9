"""Which linear layers an adapter goes into, by architecture."""

from __future__ import annotations

import difflib

import torch

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
}


class TargetError(ValueError):
    """Target modules that cannot be resolved for this model."""


def default_targets(model_type: str) -> list[str]:
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TargetError(
        f"model type {model_type!r} has no default target modules (known: {', '.join(DEFAULT_TARGETS)}); "
        "pass target_modules explicitly, e.g. target_modules=['q_proj', 'v_proj']"
    )


def linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """Last name component of every linear layer peft can adapt, e.g. 'q_proj'; the output head excluded."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers

    linear = (torch.nn.Linear, Conv1D)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear)}
    names.discard("lm_head")
    return sorted(names)


def resolve_targets(model: torch.nn.Module, target_modules) -> list[str] | str:
    """Explicit targets win; else the architecture's defaults. A list is checked against
    the model's linear layers so a typo is an error here, not an empty adapter."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    targets = target_modules if target_modules else default_targets(model_type)
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


def _matches_full_name(model: torch.nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())
