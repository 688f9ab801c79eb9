"""get_lorasym_model on tiny Llama and Mistral models: targets, inits, frozen factors, counts."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from asymllm import LoRASYMConfig, count_parameters, get_lorasym_model, lora_layers
from asymllm.adapters.recipe import RecipeError
from asymllm.adapters.targets import LLAMA_LIKE, TargetError
from asymllm.tiny import tiny_causal_lm

R = 4


def adapted(arch="llama", recipe="A_rand_hB_zero", seed=0, **kwargs):
    return get_lorasym_model(tiny_causal_lm(arch, seed=0), LoRASYMConfig(recipe=recipe, r=R, seed=seed, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_default_targets_are_the_seven_projections_of_every_layer(arch):
    model = adapted(arch)
    names = [name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)]
    assert sorted(set(names)) == sorted(LLAMA_LIKE)
    assert len(names) == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_asym_recipe_state_at_init(arch, token_batch):
    base = tiny_causal_lm(arch, seed=0)
    with torch.no_grad():
        base_logits = base(token_batch).logits
    model = get_lorasym_model(base, LoRASYMConfig(recipe="A_rand_hB_zero", r=R))
    for _, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not a.requires_grad and b.requires_grad
        torch.testing.assert_close(a @ a.T, torch.eye(R), atol=1e-5, rtol=0)
        assert torch.count_nonzero(b) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(token_batch).logits, base_logits, atol=0, rtol=0)


def test_trainable_count_is_B_only_and_true(tiny_llama):
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="A_rand_hB_zero", r=R))
    expected = sum(R * layer.out_features for _, layer in lora_layers(model))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
    lora = get_lorasym_model(tiny_causal_lm(), LoRASYMConfig(recipe="lora", r=R))
    both = sum(R * (layer.out_features + layer.in_features) for _, layer in lora_layers(lora))
    assert count_parameters(lora)[0] == both


def train_steps(model, batch, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_frozen_means_frozen(tiny_llama, token_batch):
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="A_rand_hB_zero", r=R))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    loss = model(input_ids=token_batch, labels=token_batch).loss
    loss.backward()
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert p.grad is None, f"{n} got a gradient"
    for _, layer in lora_layers(model):
        assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    model.zero_grad()
    optimizer = train_steps(model, token_batch)
    state_ids = {id(p) for p in optimizer.state}
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert id(p) not in state_ids
            assert torch.equal(p, before[n])
        elif "lora_B" in n:
            assert not torch.equal(p, before[n])


def test_a_only_trains_A_from_zero(tiny_llama, token_batch):
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="a_only", r=R))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train_steps(model, token_batch)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.count_nonzero(before[n]) == 0 and torch.count_nonzero(p) > 0
        elif "lora_B" in n:
            assert torch.equal(p, before[n])


def test_rand_factor_reproducible_from_seed_and_name():
    first, again, other = adapted(seed=3), adapted(seed=3), adapted(seed=4)
    for (name, l1), (_, l2), (_, l3) in zip(lora_layers(first), lora_layers(again), lora_layers(other)):
        assert torch.equal(l1.lora_A["default"].weight, l2.lora_A["default"].weight)
        assert not torch.equal(l1.lora_A["default"].weight, l3.lora_A["default"].weight)
    layers = [layer.lora_A["default"].weight for _, layer in lora_layers(first)]
    assert not torch.equal(layers[0], layers[7])  # same shape, other module: other factor


def test_V_init_uses_the_weight_as_loaded_not_a_fresh_layer(token_batch):
    # The original code took the SVD before the pretrained weight was attached.
    model = tiny_causal_lm(seed=0)
    pretrained = tiny_causal_lm(seed=1).state_dict()
    model.load_state_dict(pretrained)
    fresh = tiny_causal_lm(seed=0).model.layers[0].self_attn.q_proj.weight
    peft_model = get_lorasym_model(model, LoRASYMConfig(recipe="A_V_hB_zero", r=R))
    a = dict(lora_layers(peft_model))["base_model.model.model.layers.0.self_attn.q_proj"].lora_A["default"].weight
    w = pretrained["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(a, torch.linalg.svd(w)[2][:R], atol=1e-5, rtol=0)
    assert (a - torch.linalg.svd(fresh)[2][:R]).abs().max() > 0.1


def test_update_rule_config_equals_recipe_name():
    by_rule = adapted(recipe=None, update_rule={"update_A": False, "update_B": True, "A_init": "rand", "B_init": "zero"})
    by_name = adapted(recipe="A_rand_hB_zero")
    for (_, l1), (_, l2) in zip(lora_layers(by_rule), lora_layers(by_name)):
        assert torch.equal(l1.lora_A["default"].weight, l2.lora_A["default"].weight)
    assert by_rule.lorasym_recipe == by_name.lorasym_recipe
    with pytest.raises(RecipeError, match="either recipe= or update_rule="):
        adapted(recipe="asym", update_rule={"update_A": False, "update_B": True, "A_init": "rand", "B_init": "zero"})


def test_recipe_that_changes_the_model_says_so(caplog, token_batch):
    with caplog.at_level("WARNING"):
        model = adapted(recipe="hA_V_hB_U")
    assert "differs from the base before training" in caplog.text
    with torch.no_grad():
        assert (model(token_batch).logits - tiny_causal_lm(seed=0)(token_batch).logits).abs().max() > 1e-4


def test_unknown_model_type_needs_explicit_targets():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TargetError, match=r"gpt2 model has no default target modules: its linear layers \['c_attn'.*--target_modules all-linear"):
        get_lorasym_model(gpt2, LoRASYMConfig(recipe="asym", r=2))
    model = get_lorasym_model(gpt2, LoRASYMConfig(recipe="asym", r=2, target_modules=["c_attn"]))
    assert len(list(lora_layers(model))) == 1


def test_targets_that_match_nothing_are_an_error(tiny_llama):
    with pytest.raises(TargetError, match=r"'qproj' -> did you mean 'q_proj'"):
        get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="asym", r=R, target_modules=["qproj"]))


def test_rank_too_large_for_orthonormal_init_names_the_module(tiny_llama):
    # k_proj is 32 x 64 here (2 kv heads of 16): r=40 cannot be orthonormal.
    with pytest.raises(ValueError, match=r"k_proj.*r=40 exceeds min"):
        get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="asym", r=40))


# --- all-linear (peft's convention): every linear layer of the transformer blocks, never the head


def _linear_names(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("targets", ["all-linear", ["all-linear"]])  # the Python API's string, the CLI's one-element list
def test_all_linear_adapts_every_linear_layer_of_the_blocks_and_never_the_head(arch, targets):
    base = (GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)) if arch == "gpt2"
            else tiny_causal_lm(arch, seed=0))
    expected = _linear_names(base) - {"lm_head"}
    assert len(expected) == {"gpt2": 4, "llama": 7, "mistral": 7}[arch] * 2  # 2 blocks
    model = get_lorasym_model(base, LoRASYMConfig(recipe="asym", r=2, target_modules=targets))
    assert {name.removeprefix("base_model.model.") for name, _ in lora_layers(model)} == expected
    assert "lm_head" not in {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)}
    assert sorted(model.peft_config["default"].target_modules) == sorted({n.rsplit(".", 1)[-1] for n in expected})


def test_all_linear_leaves_linear_layers_outside_the_blocks_alone(tiny_llama):
    tiny_llama.model.projector = torch.nn.Linear(64, 64)  # e.g. a multimodal projector: not a transformer block
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="asym", r=2, target_modules="all-linear"))
    adapted_names = {name for name, _ in lora_layers(model)}
    assert len(adapted_names) == 7 * tiny_llama.config.num_hidden_layers
    assert not any("projector" in name or "lm_head" in name for name in adapted_names)


def test_all_linear_stands_alone(tiny_llama):
    with pytest.raises(TargetError, match="'all-linear' already means every linear layer"):
        get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="asym", r=2, target_modules=["all-linear", "q_proj"]))
