"""Real 2-rank DeepSpeed ZeRO-2 (bf16, fp16) and ZeRO-1 (bf16) runs on CPU, rebuilt from their shards alone.

DeepSpeed casts every parameter (the frozen A too) to the training dtype at every ZeRO stage,
so B was trained against bf16(A): the rebuilt frozen factor must be exactly that, bit for bit.

    pytest tests/test_export_zero2.py      # slow: three 2-rank runs, ~1 min on 2 cores
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))
import sft_runs as runs  # noqa: E402  (launching, ports and the environment of every distributed test)

from asymllm.export.command import export  # noqa: E402
from asymllm.export.zero_checkpoint import rebuild_adapter  # noqa: E402

WORKER = str(runs.REPO / "tests" / "dist" / "zero2_mixed_precision_worker.py")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module", params=[("bf16", 2), ("fp16", 2), ("bf16", 1)], ids=lambda p: f"zero{p[1]}-{p[0]}")
def zero_run(request, tmp_path_factory):
    precision, stage = request.param
    if precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():  # DeepSpeed's CPU accelerator asks the CPU (AVX2-only: no)
            pytest.skip("DeepSpeed refuses fp16 on this CPU ('Type fp16 is not supported on your device')")
    out = tmp_path_factory.mktemp(f"zero{stage}_{precision}") / "run"
    out.mkdir()
    model = runs.tiny_model_dir(tmp_path_factory)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(runs.free_port()), WORKER, model, str(out), precision, str(stage)]
    runs.launch([command], out.parent, what=f"torchrun 2 ranks ZeRO-{stage} {precision}")
    return precision, stage, model, out


@pytest.mark.slow
def test_frozen_factor_rebuilt_from_zero1_2_shards_is_the_one_B_was_trained_against(zero_run, tmp_path):
    precision, stage, model, out = zero_run
    checkpoint = out / "checkpoint-4"
    (model_states,) = runs.deepspeed_model_states(checkpoint)  # ZeRO-1/2: one model-state file, optimizer per rank
    assert model_states["ds_config"]["zero_optimization"]["stage"] == stage
    assert len(list((checkpoint / "global_step4").glob("*optim_states.pt"))) == 2, "a 2-rank run"
    assert not (checkpoint / "adapter_model.safetensors").exists(), "the shards alone must do"
    used = torch.load(out / "trained_factors.pt")          # the module's parameters in the training forward
    assert {t.dtype for t in used.values()} == {DTYPES[precision]}, "DeepSpeed casts the frozen A too"
    with safe_open(os.path.join(model, "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rebuilt = rebuild_adapter(str(checkpoint), shapes.__getitem__)
    frozen = sorted(k for k in used if ".lora_A." in k)
    assert sorted(rebuilt.rebuilt) == frozen and len(frozen) == 14
    assert sorted(rebuilt.tensors) == sorted(used)
    for key, value in used.items():
        got = rebuilt.tensors[key]
        assert got.dtype == value.dtype and torch.equal(got, value), f"{key}: not the factor the forward used"
    assert any(not torch.equal(used[k.replace("lora_A", "lora_B")], torch.zeros_like(used[k.replace("lora_A", "lora_B")]))
               for k in frozen), "B must have trained, or the run proves nothing"

    # and through `asymllm export`: the adapter-only export of the checkpoint holds those tensors
    export(adapter=str(checkpoint), output=str(tmp_path / "served"), base=model, adapter_only=True)
    served = load_file(tmp_path / "served" / "adapter_model.safetensors")
    assert sorted(served) == sorted(used) and all(torch.equal(served[k], used[k]) for k in used)
