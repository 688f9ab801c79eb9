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


def pair(family: str, recipe: str = "A_rand_hB_zero", **config):
    """(peft's forward, fused) adapters of the same base, with a B already away from zero so that
    the adapter term is in every number compared."""
    plain = get_lorasym_model(tiny_causal_lm(family, seed=0), LoRASYMConfig(recipe=recipe, r=R, seed=3, fuse_frozen_a=False, **config))
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


def close(a, b, what):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0), f"{what}: fused and peft differ by {(a - b).abs().max():.3g}"


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


def test_a_cast_or_autocast_after_fusing_still_gives_peft_numbers(token_batch):
    plain, fused = pair("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # peft's forward, as autocast casts per op
        assert torch.equal(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits)
    plain.double(), fused.double()
    close(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits, "after .double()")
    assert fused_count(fused) == 14


def test_unfuse_returns_to_peft_forward_and_reloads_in_plain_peft(token_batch, tmp_path):
    plain, fused = pair("mistral")
    folder = save_adapter(fused, str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("mistral", seed=0), folder)
    close(reloaded(input_ids=token_batch).logits, fused(input_ids=token_batch).logits, "plain peft reload")
    unfuse_frozen_a(fused)
    assert fused_count(fused) == 0
    close(fused(input_ids=token_batch).logits, plain(input_ids=token_batch).logits, "unfused")
