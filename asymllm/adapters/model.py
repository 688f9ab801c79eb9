"""LoRASYM adapters: a peft LoRA adapter whose factors a recipe initialised and froze.

The forward pass is peft's LoRA (`y = W0 x + s * B A x`), so an adapter saved here
loads in plain peft. What asymllm adds is *how the factors start and which train*:

    from asymllm import LoRASYMConfig, get_lorasym_model
    model = get_lorasym_model(base, LoRASYMConfig(recipe="A_rand_hB_zero", r=16))
    model.print_trainable_parameters()   # B only: r * d_out per module
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from ..quantization import dequantized_weight, is_quantized_layer
from ..zero import broadcast_from_rank0, gathered, is_partitioned, true_shape
from .fused import fuse_frozen_a
from .init import init_factor, module_seed
from .recipe import Recipe, RecipeError
from .recipe_file import record_recipe_on_save
from .targets import fused_targets_note, resolve_targets

logger = logging.getLogger(__name__)

# The adapter defaults, stated once: LoRASYMConfig (the Python API) and `asymllm train`'s flags
# (config.AdapterArguments) use these, and docs/training.md documents them.
DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32.0
DEFAULT_LORA_DROPOUT = 0.0


@dataclass
class LoRASYMConfig:
    """peft's LoRA hyper-parameters plus the recipe (a name, or the original README's update_rule)."""

    recipe: str | Recipe | None = None
    update_rule: dict | None = None
    r: int = DEFAULT_LORA_R
    lora_alpha: float = DEFAULT_LORA_ALPHA
    lora_dropout: float = DEFAULT_LORA_DROPOUT
    bias: str = "none"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    task_type: str = "CAUSAL_LM"
    seed: int = 42
    fuse_frozen_a: bool = True  # a frozen A's projection in the base GEMM where it applies (adapters/fused.py)
    extra_lora_kwargs: dict = field(default_factory=dict)

    def resolved_recipe(self) -> Recipe:
        if self.recipe is not None and self.update_rule is not None:
            raise RecipeError("give either recipe= or update_rule=, not both")
        if self.update_rule is not None:
            return Recipe.from_update_rule(self.update_rule)
        if isinstance(self.recipe, Recipe):  # parsed once, at the entry point: passed down as it is
            self.recipe.validate(source=self.recipe.name)
            return self.recipe
        return Recipe.parse(self.recipe if self.recipe is not None else "asym")

    def to_lora_config(self, target_modules) -> LoraConfig:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the adapter rank) must be a positive integer, got {self.r!r}")
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, bias=self.bias,
            target_modules=target_modules, modules_to_save=self.modules_to_save,
            use_rslora=self.use_rslora, task_type=self.task_type, **self.extra_lora_kwargs,
        )


def get_lorasym_model(model: torch.nn.Module, config: LoRASYMConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` in a peft LoRA adapter and apply the recipe to every adapted module.

    Under ZeRO-3 (model loaded partitioned) the SVD inits read the gathered full weight;
    every rank must call this, as it enters collectives.
    """
    recipe = config.resolved_recipe()
    targets = resolve_targets(model, config.target_modules)
    if fused_targets_note(targets):
        logger.info(fused_targets_note(targets))
    lora_config = config.to_lora_config(targets)
    # Under ZeRO-3, peft's upcast of adapters to fp32 next to a bf16 base breaks the first
    # optimizer step (docs/design.md, trap 10); keep adapter dtype = base dtype there, as TRL does.
    zero3 = any(is_partitioned(p) for p in model.parameters())
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=not zero3)
    apply_recipe(peft_model, recipe, seed=config.seed, adapter_name=adapter_name)
    if recipe.changes_model_at_init:
        logger.warning("recipe %s: B@A != 0 at step 0, so the adapted model differs from the base before training", recipe.name)
    if config.fuse_frozen_a:
        fuse_frozen_a(peft_model, adapter_name)
    else:
        peft_model.lorasym_adapter_path = "adapter path: peft's LoRA forward (--fused_frozen_a false)"
    logger.info(peft_model.lorasym_adapter_path)
    return peft_model


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """(module name, layer) for every module that carries `adapter_name`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def apply_recipe(model: PeftModel, recipe: Recipe | str, seed: int, adapter_name: str = "default") -> None:
    """Initialise A and B of every adapted module as the recipe says, and freeze what it freezes."""
    if not isinstance(recipe, Recipe):  # a name, from Python callers; get_lorasym_model passes a Recipe
        recipe = Recipe.parse(recipe)
    layers = list(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    for name, layer in layers:
        _init_layer(layer, _canonical_name(name), recipe, seed, adapter_name)
    set_recipe_trainability(model, recipe, adapter_name)
    model.lorasym_recipe = recipe
    model.lorasym_seed = seed
    record_recipe_on_save(model)


def set_recipe_trainability(model: torch.nn.Module, recipe: Recipe, adapter_name: str = "default") -> None:
    """requires_grad per factor: a frozen factor gets no gradient and no optimizer state."""
    for _, layer in lora_layers(model, adapter_name):
        layer.lora_A[adapter_name].weight.requires_grad_(recipe.A.trainable)
        layer.lora_B[adapter_name].weight.requires_grad_(recipe.B.trainable)


def _canonical_name(module_name: str) -> str:
    """The module's name relative to the base model, so seeds do not depend on wrapping
    ('base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj')."""
    return module_name.removeprefix("base_model.model.")


def _init_layer(layer: LoraLayer, name: str, recipe: Recipe, seed: int, adapter_name: str) -> None:
    weight_shape = (layer.out_features, layer.in_features)
    r = layer.r[adapter_name]
    full_weight = None
    if recipe.needs_pretrained_weight:
        base = layer.get_base_layer()
        # a 4/8-bit base: the SVD of the dequantized weight, the one its forward (and the adapter) sees
        full_weight = dequantized_weight(base) if is_quantized_layer(base) else _full_weight(base.weight)
        if getattr(layer, "fan_in_fan_out", False):  # GPT-2 Conv1D stores W0 as d_in x d_out
            full_weight = full_weight.T
    values = {}
    for letter, factor in (("A", recipe.A), ("B", recipe.B)):
        value = init_factor(letter, factor.init, r, weight_shape, module_seed(seed, name, letter),
                            weight=full_weight, where=name)
        # rand/he/zero come from a CPU generator and are identical everywhere by construction;
        # an SVD is only as deterministic as its kernel, so every rank takes rank 0's factors.
        values[letter] = broadcast_from_rank0(value) if factor.init in ("V", "U") else value
    targets = {"A": layer.lora_A[adapter_name].weight, "B": layer.lora_B[adapter_name].weight}
    with gathered(targets.values(), modifier_rank=0), torch.no_grad():
        for letter, param in targets.items():
            param.copy_(values[letter].to(device=param.device, dtype=param.dtype))


def _full_weight(base_weight: torch.nn.Parameter) -> torch.Tensor:
    """The full pretrained W0 as float32: gathered under ZeRO-3 (every rank must enter)."""
    with gathered([base_weight], modifier_rank=None):
        weight = base_weight.detach().float().clone()
    if weight.shape != torch.Size(true_shape(base_weight)):
        raise RuntimeError(f"gathered weight has shape {tuple(weight.shape)}, expected {true_shape(base_weight)}")
    return weight
