"""One rank of a 2-process DeepSpeed ZeRO-3 check of LoRASYM adapters (CPU, gloo).

Launched by tests/test_zero3_adapter.py; by hand:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        tests/dist/zero3_adapter_worker.py --out /tmp/zero3

Each rank checks what it can see locally (asserts: a failure exits non-zero and the
launcher fails) and writes what needs comparing across ranks or against a
single-process run to --out:

    base_state.pt          rank 0: the gathered full base weights (the reference W0)
    rank{r}_V.pt           {module: lora_A} after recipe A_V_hB_zero
    rank{r}_rand.pt        {module: lora_A} after recipe A_rand_hB_zero
    rank{r}_info.json      local shapes and parameter counts seen under ZeRO-3
    adapter/               asymllm.save_adapter of the V model after deepspeed.initialize
                           and one optimizer step
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from asymllm import LoRASYMConfig, count_parameters, get_lorasym_model, lora_layers, save_adapter
from asymllm.tiny import tiny_config
from asymllm.zero import is_partitioned, true_shape

R = 4               # adapter rank
MODEL_SEED = 0      # seed of the random base model
ADAPTER_SEED = 7    # LoRASYMConfig.seed
PROBE = "model.layers.0.self_attn.q_proj"   # a module whose partitioning we look at


def ds_config(world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        # Without threshold 0 a tiny model's parameters all stay "persistent" (unpartitioned)
        # and the test would prove nothing.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_partitioned_base() -> torch.nn.Module:
    """The tiny Llama, partitioned at construction (zero.Init via the live HfDeepSpeedConfig)."""
    torch.manual_seed(MODEL_SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="sdpa")
    weight = model.get_submodule(PROBE).weight
    assert is_partitioned(weight), "from_config under HfDeepSpeedConfig did not partition the model"
    assert weight.shape == (0,), f"{PROBE}.weight is {tuple(weight.shape)} locally; ZeRO-3 should leave (0,)"
    assert true_shape(weight) == (64, 64), true_shape(weight)
    return model.eval()


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value, read inside GatheredParameters (a collective)."""
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().clone() for name, p in params.items()}


def canonical(peft_module_name: str) -> str:
    return peft_module_name.removeprefix("base_model.model.")


def lora_a_values(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module: full lora_A}; gathered, so it also works once the factors are partitioned."""
    layers = list(lora_layers(peft_model))
    params = [layer.lora_A["default"].weight for _, layer in layers]
    with deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=None):
        return {canonical(name): p.detach().clone() for (name, _), p in zip(layers, params)}


def lora_b_values(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    layers = list(lora_layers(peft_model))
    params = [layer.lora_B["default"].weight for _, layer in layers]
    with deepspeed.zero.GatheredParameters([p for p in params if is_partitioned(p)], modifier_rank=None):
        return {canonical(name): p.detach().clone() for (name, _), p in zip(layers, params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out

    dist.init_process_group(backend="gloo")
    deepspeed.init_distributed(dist_backend="gloo")   # adopts the process group above
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"this check wants 2 ranks, got {world}"
    config = ds_config(world)
    hf_ds_config = HfDeepSpeedConfig(config)   # noqa: F841 -- must stay alive: transformers holds a weakref
    info: dict = {"rank": rank, "world": world}

    # --- 1. V init of A on a partitioned base: the SVD must read the gathered full W0.
    base = build_partitioned_base()
    full = gathered_state(base)
    if rank == 0:
        torch.save(full, os.path.join(out, "base_state.pt"))
    model_v = get_lorasym_model(base, LoRASYMConfig(recipe="A_V_hB_zero", r=R, seed=ADAPTER_SEED))
    base_weight = model_v.get_submodule("base_model.model." + PROBE).base_layer.weight
    info["base_weight_local_shape_after_peft"] = list(base_weight.shape)
    assert base_weight.shape == (0,), f"{PROBE}.base_layer.weight not partitioned after peft: {tuple(base_weight.shape)}"

    a_v = lora_a_values(model_v)
    assert len(a_v) == 14, sorted(a_v)    # 7 projections x 2 layers
    for name, a in a_v.items():
        w0 = full[name + ".weight"]
        assert w0.numel() > 0 and a.shape == (R, w0.shape[1]), (name, tuple(w0.shape), tuple(a.shape))
        expected = torch.linalg.svd(w0.float(), full_matrices=False)[2][:R]
        diff = (a.float() - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: V init of A differs from Vh[:r] of the full weight by {diff:.3g}"
    for name, b in lora_b_values(model_v).items():
        assert torch.count_nonzero(b) == 0, f"{name}: B of A_V_hB_zero is not zero at init"
    torch.save(a_v, os.path.join(out, f"rank{rank}_V.pt"))

    # --- 2. rand init of A: from a CPU generator seeded by (seed, module name) -> same on every rank.
    model_rand = get_lorasym_model(build_partitioned_base(), LoRASYMConfig(recipe="A_rand_hB_zero", r=R, seed=ADAPTER_SEED))
    a_rand = lora_a_values(model_rand)
    info["adapter_path"] = model_rand.lorasym_adapter_path
    for name, a in a_rand.items():
        gram = a.double() @ a.double().T
        assert torch.allclose(gram, torch.eye(R, dtype=torch.float64), atol=1e-5), f"{name}: rand A rows not orthonormal"
    torch.save(a_rand, os.path.join(out, f"rank{rank}_rand.pt"))
    del model_rand

    # --- 3. deepspeed.initialize partitions the LoRA factors too; counts and save must see through it.
    trainable = [p for p in model_v.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model_v, config=config, model_parameters=trainable)
    peft_model = engine.module
    probe = peft_model.get_submodule("base_model.model." + PROBE)
    info["lora_A_local_shape"] = list(probe.lora_A["default"].weight.shape)
    info["lora_B_local_shape"] = list(probe.lora_B["default"].weight.shape)
    assert probe.lora_A["default"].weight.shape == (0,), "lora_A not partitioned by deepspeed.initialize"
    assert probe.lora_B["default"].weight.shape == (0,), "lora_B not partitioned by deepspeed.initialize"

    n_trainable, n_total = count_parameters(peft_model)
    info["count_trainable"], info["count_total"] = n_trainable, n_total
    info["plain_numel_trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info["expected_trainable"] = sum(R * layer.out_features for _, layer in lora_layers(peft_model))
    info["expected_total"] = sum(t.numel() for t in full.values()) + sum(
        R * (layer.in_features + layer.out_features) for _, layer in lora_layers(peft_model))

    # One optimizer step: the frozen A must not move, the trained B must.
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 256, (1, 16), generator=generator)
    engine.train()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    a_after = lora_a_values(peft_model)
    b_after = lora_b_values(peft_model)
    for name in a_v:
        assert torch.equal(a_after[name], a_v[name]), f"{name}: frozen A changed in an optimizer step"
        assert torch.count_nonzero(b_after[name]) > 0, f"{name}: B did not move in an optimizer step"
    info["loss"] = loss.item()

    save_adapter(peft_model, os.path.join(out, "adapter"))
    torch.save(b_after, os.path.join(out, f"rank{rank}_B_after_step.pt"))
    with open(os.path.join(out, f"rank{rank}_info.json"), "w") as f:
        json.dump(info, f, indent=2)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
