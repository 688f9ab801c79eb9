"""The fused frozen-A path: a layer whose base and A are frozen as one autograd node.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: four modules, a separate
adapter output of T x d_out, a multiply and an add over it, and autograd nodes for each.
With W and A frozen, one node does it all: `y = x W^T` with `s (x A^T) B^T` added into y in
place (addmm_), and in backward B's gradient `s g^T h` and the input gradient
`g W + (s g B) A`, A's part added in place. Only h = x A^T (T x r) is saved, never x
(T x d_in). The numbers are peft's to fp32 rounding; the saved adapter is the same file (A
and B stay the module's own parameters, W is not copied).

Computing `x @ [W; A]^T` as one product was measured too (benchmarks/RESULTS.md,
adapter_step): on the CPUs here the wider GEMM ran slower than the base GEMM plus the skinny
x A^T, so A's product stays its own.

Dtypes follow peft's forward. Beside a bf16 base peft keeps the adapters in fp32 and computes
`x A^T` and its product with B in fp32, adds in fp32 and casts back; the node does the same.
Under autocast (a GPU `--bf16` run, `--cpu_autocast_bf16`) every product runs in the autocast
dtype, as autocast would run peft's four linears; the fp32 B is cast differentiably, so its
gradient reaches the fp32 master copy.

Where the path does not apply, the layer runs peft's own forward; `fuse_frozen_a` says
which and why. It never applies to a partitioned (ZeRO-3) or quantized base, an A that
trains, dropout on the adapter input, DoRA, a trained bias, or several active adapters.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..zero import is_partitioned

logger = logging.getLogger(__name__)


class FrozenAProduct(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T with W and A frozen; B may train.

    Saves only h = x A^T (T x r) for B's gradient, never x (T x d_in): W and A need no
    gradient, so backward needs x only through them.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        h = F.linear(flat.to(lora_A.dtype), lora_A)  # peft computes the adapter in its own dtype
        y = F.linear(flat, weight)
        if y.dtype == h.dtype:
            y.addmm_(h, lora_B.t(), alpha=scaling)  # no separate adapter output
        else:  # a bf16 base beside fp32 adapters: peft adds in the adapter's dtype, then casts back
            y = y.to(h.dtype).addmm_(h, lora_B.t(), alpha=scaling).to(y.dtype)
        ctx.save_for_backward(weight, lora_A, lora_B, h)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        weight, lora_A, lora_B, h = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        g_adapter = g.to(lora_B.dtype)
        grad_x = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(g_adapter.t(), h).mul_(ctx.scaling)
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(g_adapter, lora_B)
            grad_x = torch.mm(g, weight)  # g W + s (g B) A
            if grad_x.dtype == grad_h.dtype:
                grad_x.addmm_(grad_h, lora_A, alpha=ctx.scaling)
            else:
                grad_x.add_(torch.mm(grad_h.mul_(ctx.scaling), lora_A).to(grad_x.dtype))
            grad_x = grad_x.view(*grad_y.shape[:-1], weight.shape[1])
        return grad_x, None, None, grad_B, None


class FusedFrozenALinear(PeftLoraLinear):
    """peft's lora.Linear whose forward takes the fused path while it applies.

    Installed by swapping the class of an existing layer, so the module, its parameters,
    state-dict keys and every isinstance check stay peft's.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._fused_now(x, args, kwargs):
            return super().forward(x, *args, **kwargs)
        name, base = self.active_adapters[0], self.get_base_layer()
        weight, lora_A, lora_B, bias = base.weight, self.lora_A[name].weight, self.lora_B[name].weight, base.bias
        scaling = float(self.scaling[name])
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # autocast runs every linear in its dtype; cast as it does (differentiably, so B's gradient
            # reaches its fp32 master copy) and run the node outside autocast, in that one dtype
            dtype = torch.get_autocast_dtype(device_type)
            x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                y = FrozenAProduct.apply(x, weight, lora_A, lora_B, scaling)
        else:
            y = FrozenAProduct.apply(x, weight, lora_A, lora_B, scaling)
        return y if bias is None else y + bias

    def _fused_now(self, x, args, kwargs) -> bool:
        """False when this call must take peft's path: checked every call, as a merge, a disabled
        adapter or a cast can come at any time after the layer was fused."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return False
        name = self.active_adapters[0]
        if name not in self.lora_A or why_not_fusable(self, name) is not None:
            return False
        if torch.is_autocast_enabled(x.device.type):  # autocast leaves float64 alone; so does peft's path
            return x.dtype != torch.float64 and self.get_base_layer().weight.dtype != torch.float64
        return x.dtype == self.get_base_layer().weight.dtype


def why_not_fusable(layer: torch.nn.Module, adapter_name: str = "default") -> str | None:
    """None if the layer can take the fused path, else the reason it cannot (for the log)."""
    base = layer.get_base_layer()
    if "bitsandbytes" in type(base).__module__:
        return "quantized base"
    if not isinstance(layer, PeftLoraLinear) or type(base) is not torch.nn.Linear:
        return f"base layer is {type(base).__name__}"
    weight, lora_A, lora_B = base.weight, layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if any(is_partitioned(p) for p in (weight, lora_A, lora_B)):
        return "ZeRO-3 partitions the weights"
    if lora_A.requires_grad:
        return "A trains"
    if weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight or bias trains"
    if not isinstance(layer.lora_dropout[adapter_name], torch.nn.Identity):
        return "dropout on the adapter input"
    if adapter_name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter_name, False):
        return "DoRA or a LoRA bias"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weight layout"
    if lora_A.dtype != lora_B.dtype or not weight.dtype.is_floating_point:
        return f"base in {weight.dtype}, A in {lora_A.dtype}, B in {lora_B.dtype}"
    if not weight.device == lora_A.device == lora_B.device:
        return "base and adapter on different devices"
    return None


def fuse_frozen_a(model: torch.nn.Module, adapter_name: str = "default") -> str:
    """Put every LoRA layer whose A is frozen (and whose base allows it) on the fused path.

    Returns the line for the log: how many layers took the fused path, and why the others did not.
    """
    fused, reasons = 0, Counter()
    for _, layer in _lora_layers(model, adapter_name):
        reason = why_not_fusable(layer, adapter_name)
        if reason is not None:
            reasons[reason] += 1
            continue
        layer.__class__ = FusedFrozenALinear
        fused += 1
    model.lorasym_adapter_path = adapter_path_line(fused, reasons)
    return model.lorasym_adapter_path


def unfuse_frozen_a(model: torch.nn.Module) -> None:
    """Back to peft's own forward everywhere."""
    for _, layer in _lora_layers(model, None):
        if type(layer) is FusedFrozenALinear:
            layer.__class__ = PeftLoraLinear
    model.lorasym_adapter_path = adapter_path_line(0, Counter({"turned off": 1}))


def adapter_path_line(fused: int, reasons: Counter) -> str:
    if fused and not reasons:
        return f"adapter path: fused frozen A (base and A in one autograd node, adapter added in place) on all {fused} adapted layers"
    why = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common())
    if not fused:
        return f"adapter path: peft's LoRA forward ({why})"
    return f"adapter path: fused frozen A on {fused} adapted layers, peft's LoRA forward on the rest ({why})"


def _lora_layers(model: torch.nn.Module, adapter_name: str | None):
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.lora_A):
            yield name, module
