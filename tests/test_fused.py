"""The fused frozen-A path (asymllm/adapters/fused.py) computes peft's numbers: forward, backward,
an optimizer step and the saved adapter, on tiny Llama and Mistral; and it is used only where it applies."""

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from asymllm import LoRASYMConfig, get_lorasym_model, lora_layers, save_adapter
from asymllm.adapters.fused import FusedFrozenALinear, fuse_frozen_a, unfuse_frozen_a
from asymllm.tiny import tiny_causal_lm

R = 8


def pair(family: str, recipe: str = "A_rand_hB_zero", dtype=torch.float32, **config):
    """(peft's forward, fused) adapters of the same base, with a B already away from zero so that
    the adapter term is in every number compared."""
    base = tiny_causal_lm(family, seed=0).to(dtype)
    plain = get_lorasym_model(base, LoRASYMConfig(recipe=recipe, r=R, seed=3, fuse_frozen_a=False, **config))
    with torch.no_grad():
        for _, layer in lora_layers(plain):
            layer.lora_B["default"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(layer.out_features))
    fused = copy.deepcopy(plain)
    fuse_frozen_a(fused)
    return plain, fused


def fused_count(model) -> int:
    return sum(type(m) is FusedFrozenALinear for m in model.modules())


def step(model, batch, optimizer=None):
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    return out


def close(a, b, what, rel=1e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1.0), f"{what}: fused and peft differ by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_fused_path_equals_peft_forward_backward_step_and_saved_adapter(family, token_batch, tmp_path):
    plain, fused = pair(family)
    assert fused_count(fused) == 14 and fused_count(plain) == 0
    assert "on all 14 adapted layers" in fused.lorasym_adapter_path
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, fused)]
    outs = [step(m, token_batch, o) for m, o in zip((plain, fused), optimizers)]
    close(outs[1].logits, outs[0].logits, "logits")
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, fused)]
    assert grads[0].keys() == grads[1].keys() and all("lora_B" in n for n in grads[0])
    for name in grads[0]:
        close(grads[1][name], grads[0][name], f"grad {name}")
    # the fused node is really in the graph, and a second forward after the step still agrees
    again = [m(input_ids=token_batch) for m in (plain, fused)]
    close(again[1].logits, again[0].logits, "logits after one AdamW step")
    saved = [load_file(save_adapter(m, str(tmp_path / name)) + "/adapter_model.safetensors")
             for m, name in ((plain, "plain"), (fused, "fused"))]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        if "lora_A" in key:
            assert torch.equal(saved[0][key], saved[1][key]), key  # frozen: bit-identical
        else:
            close(saved[1][key], saved[0][key], key)


def test_the_fused_layer_is_one_autograd_node_that_saves_h_not_x(tiny_llama):
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="A_rand_hB_zero", r=R))
    layer = dict(lora_layers(model))["base_model.model.model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "FrozenAProductBackward"
    params = {p.data_ptr() for p in layer.parameters()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert [tuple(t.shape) for t in activations] == [(15, R)]  # h = x A^T; x (15 x d_in) is not kept


def test_a_trained_A_dropout_or_a_merge_takes_peft_forward_and_says_why(token_batch):
    lora = get_lorasym_model(tiny_causal_lm("llama", seed=0), LoRASYMConfig(recipe="lora", r=R))
    assert fused_count(lora) == 0 and lora.lorasym_adapter_path == "adapter path: peft's LoRA forward (A trains (14))"
    dropout = get_lorasym_model(tiny_causal_lm("llama", seed=0), LoRASYMConfig(recipe="A_rand_hB_zero", r=R, lora_dropout=0.1))
    assert "dropout on the adapter input (14)" in dropout.lorasym_adapter_path
    plain, fused = pair("llama")
    fused.merge_adapter()
    close(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits, "merged fused vs unmerged peft")
    fused.unmerge_adapter()
    with fused.disable_adapter():
        base = fused(input_ids=token_batch).logits
    with plain.disable_adapter():  # merge + unmerge leaves W off by rounding, as peft's does
        close(base, plain(input_ids=token_batch).logits, "adapter disabled")


def lora_B_calls(model) -> list:
    """Records every call of a lora_B module: peft's forward makes them, the fused node does not."""
    calls = []
    for _, layer in lora_layers(model):
        layer.lora_B["default"].register_forward_hook(lambda *_: calls.append(1))
    return calls


def forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_under_autocast_the_fused_node_runs_in_bf16_as_autocast_runs_peft(token_batch):
    """--cpu_autocast_bf16 and a GPU --bf16 run train under autocast: the fused node takes it,
    computes in bf16 (fp32 master B), and is as close to the fp32 numbers as peft's forward is."""
    plain, fused = pair("llama")
    reference = forward_backward(plain, token_batch)  # fp32, no autocast
    calls = [lora_B_calls(m) for m in (plain, fused)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16, fused_bf16 = forward_backward(plain, token_batch), forward_backward(fused, token_batch)
    assert len(calls[0]) == 14 and calls[1] == []  # peft's path called every lora_B; the fused one none
    assert all(p.dtype == torch.float32 for n, p in fused.named_parameters() if "lora_" in n)
    for (name, ref), ours, peft in zip([("logits", reference[0])] + sorted(reference[1].items()),
                                       [fused_bf16[0]] + [fused_bf16[1][n] for n in sorted(reference[1])],
                                       [peft_bf16[0]] + [peft_bf16[1][n] for n in sorted(reference[1])]):
        scale = ref.abs().max().item()
        ours_err, peft_err = (ours - ref).abs().max().item(), (peft - ref).abs().max().item()
        assert peft_err > 1e-4 * scale, f"{name}: autocast changed nothing, so this compares nothing"
        assert ours_err <= 2 * peft_err + 1e-3 * scale, f"{name}: fused bf16 off by {ours_err:.3g}, peft's by {peft_err:.3g}"


def test_a_bf16_base_with_fp32_adapters_takes_the_fused_path_in_peft_dtypes(token_batch):
    """A bf16 base gets fp32 adapters from peft; the node computes the adapter in fp32 as peft does."""
    plain, fused = pair("mistral", dtype=torch.bfloat16)
    layer = next(m for m in fused.modules() if type(m) is FusedFrozenALinear)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16 and layer.lora_B["default"].weight.dtype == torch.float32
    assert fused_count(fused) == 14
    calls = lora_B_calls(fused)
    (plain_logits, plain_grads), (fused_logits, fused_grads) = forward_backward(plain, token_batch), forward_backward(fused, token_batch)
    assert calls == []
    close(fused_logits, plain_logits, "logits, bf16 base", rel=2e-2)
    for name in plain_grads:
        close(fused_grads[name], plain_grads[name], f"grad {name}, bf16 base", rel=5e-2)


def test_a_cast_after_fusing_still_gives_peft_numbers(token_batch):
    plain, fused = pair("llama")
    plain.double(), fused.double()
    close(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits, "after .double()")
    assert fused_count(fused) == 14
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone; the node does too
        assert torch.equal(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits)


def test_unfuse_returns_to_peft_forward_and_reloads_in_plain_peft(token_batch, tmp_path):
    plain, fused = pair("mistral")
    folder = save_adapter(fused, str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("mistral", seed=0), folder)
    close(reloaded(input_ids=token_batch).logits, fused(input_ids=token_batch).logits, "plain peft reload")
    unfuse_frozen_a(fused)
    assert fused_count(fused) == 0
    close(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits, "unfused")
