"""`launch/sft.py` on several CPU processes, as a user launches it: torchrun with ZeRO-3,
two torchrun "nodes" meeting on 127.0.0.1, the deepspeed launcher with ZeRO-2, and plain
data parallel (DDP, no DeepSpeed) under torchrun, accelerate launch and the deepspeed launcher.

Every run trains A_rand_hB_zero (A frozen) on a tiny Llama for 8 steps with seed 1234 and
a global batch of 8, so that all of them must end with the same adapter:
- under ZeRO-3 the base is really partitioned (each rank holds (0,) of a weight), and so
  are the LoRA factors once deepspeed.initialize has run;
- the frozen A is bit-identical to the one built here from the seed, and every B trained;
- the final adapter and every checkpoint-N/ adapter are complete (the frozen A included:
  transformers' own ZeRO-3 save drops it) and reload identically, in asymllm and in plain peft;
- 2 ranks x batch 4 (ZeRO-3) == 1 process x batch 8 (measured 4e-9), 2 nodes == 1 node
  with 2 ranks (measured 0), deepspeed launcher ZeRO-2 == 1 process;
- DDP: both ranks train as one job (accelerate's MULTI_CPU state, the model wrapped in
  DistributedDataParallel) and the adapter rank 0 saves == the ZeRO-3 one (measured 3.3e-9 for each launcher).

About 120 s on a quiet 2-core machine (a launch takes 7 s in one process, 17-18 s with 2
ranks); the 1-process and ZeRO-3 runs are shared with tests/test_resume.py. The Slurm
script's check is fast (not marked slow).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm import load_lorasym_model, verify_adapter_dir  # noqa: E402

slow = pytest.mark.slow  # every test that launches training; the fixtures run only for them


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return runs.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_A(model_dir):
    return runs.reference_A(model_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return runs.uninterrupted_single(tmp_path_factory)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return runs.uninterrupted_zero3(tmp_path_factory)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, model_dir):
    """`torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1`, both started at once."""
    out = tmp_path_factory.mktemp("two_nodes") / "out"
    port = runs.free_port()
    commands = [runs.torchrun_command(out, model_dir, "--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2),
                                      "--deepspeed", runs.zero3_config(tmp_path_factory), nproc=1, port=port,
                                      node_args=("--nnodes", "2", "--node_rank", str(node)))
                for node in (0, 1)]
    return runs.Run(out, runs.launch(commands, out.parent, what="torchrun 2 nodes ZeRO-3"))


@pytest.fixture(scope="module")
def deepspeed_zero2(tmp_path_factory, model_dir):
    """The DeepSpeed launcher, as documented: `deepspeed --num_gpus 2 launch/sft.py ...`. On a
    machine without GPUs it still starts 2 local ranks (DeepSpeed's CPU accelerator)."""
    out = tmp_path_factory.mktemp("deepspeed_zero2") / "out"
    command = runs.deepspeed_command(out, model_dir, "--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2),
                                     "--deepspeed", str(runs.REPO / "ds_configs" / "zero2.json"))
    return runs.Run(out, runs.launch([command], out.parent, what="deepspeed launcher ZeRO-2"))


def _assert_trained_asymmetrically(tensors: dict, reference_A: dict, where: str) -> None:
    a_keys, b_keys = runs.factor_keys(tensors, "lora_A"), runs.factor_keys(tensors, "lora_B")
    assert a_keys == sorted(reference_A) and len(b_keys) == len(a_keys) == runs.N_TENSORS // 2, where
    for key in a_keys:
        assert torch.equal(tensors[key], reference_A[key]), f"{where}: frozen {key} is not bit-identical to its seeded init"
    for key in b_keys:
        assert torch.count_nonzero(tensors[key]) > 0, f"{where}: {key} is still zero: B did not train"


# ---- ZeRO-3, torchrun, 2 ranks


@slow
def test_zero3_base_and_adapter_really_partitioned(zero3):
    for rank in (0, 1):
        info = runs.probe_info(zero3, rank)
        assert info["world_size"] == 2
        assert info["base_params_partitioned"] == info["base_params"] > 0, "from_pretrained did not load the base partitioned"
        assert info["base_probe_weight"] == {"local_shape": [0], "true_shape": [64, 64], "partitioned": True}
        assert info["base_probe_weight_after_peft"]["local_shape"] == [0]
        begin = info["train_begin"]   # after deepspeed.initialize: the LoRA factors are partitioned too
        assert begin["lora_A"] == {"local_shape": [0], "true_shape": [runs.R, 64], "partitioned": True}
        assert begin["lora_B"] == {"local_shape": [0], "true_shape": [64, runs.R], "partitioned": True}
    for states in runs.deepspeed_model_states(zero3.output_dir / "checkpoint-8"):
        assert states["ds_config"]["zero_optimization"]["stage"] == 3
        assert states["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
        assert states["dp_world_size"] == 2


@slow
def test_zero3_frozen_A_bit_identical_and_every_B_trained(zero3, reference_A):
    _assert_trained_asymmetrically(runs.adapter_tensors(zero3.output_dir / "adapter"), reference_A, "ZeRO-3 adapter")


@slow
def test_zero3_adapter_and_every_checkpoint_complete(zero3, reference_A):
    """transformers saves ZeRO-3 PEFT checkpoints without frozen parameters; asymllm's must hold A."""
    final = runs.adapter_tensors(zero3.output_dir / "adapter")
    checkpoints = sorted(p.name for p in zero3.output_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    for name in ["adapter", *checkpoints]:
        folder = zero3.output_dir / name
        shapes = verify_adapter_dir(str(folder))
        assert len(shapes) == runs.N_TENSORS, f"{name}: {sorted(shapes)}"
        record = json.loads((folder / "lorasym.json").read_text())
        assert (record["recipe"], record["seed"]) == (runs.RECIPE, runs.SEED), name
        tensors = runs.adapter_tensors(folder)
        for key in runs.factor_keys(tensors, "lora_A"):
            assert torch.equal(tensors[key], reference_A[key]), f"{name}: {key}"
    last = runs.adapter_tensors(zero3.output_dir / "checkpoint-8")
    assert all(torch.equal(last[k], final[k]) for k in final), "checkpoint-8 and the final adapter differ"
    mid = runs.adapter_tensors(zero3.output_dir / "checkpoint-4")
    assert runs.max_abs_diff(mid, final) > 0, "checkpoint-4 already holds the final B"


@slow
def test_zero3_adapter_reloads_identically(zero3, model_dir):
    """asymllm's loader and plain peft give the file's tensors and the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = str(zero3.output_dir / "adapter")
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    ours = load_lorasym_model(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    lora = {n.replace(".default.", "."): p for n, p in ours.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(saved)
    for key, param in lora.items():
        assert torch.equal(param.detach(), saved[key]), key
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, plain_logits = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        with plain.disable_adapter():
            without = plain(input_ids=ids).logits
    assert torch.equal(ours_logits, plain_logits)
    assert (ours_logits - without).abs().max() > 1e-4, "the trained adapter does not change the model"


@slow
def test_zero3_two_ranks_equal_one_process_with_the_same_global_batch(zero3, single, reference_A):
    one = runs.adapter_tensors(single.output_dir / "adapter")
    _assert_trained_asymmetrically(one, reference_A, "1-process adapter")
    two = runs.adapter_tensors(zero3.output_dir / "adapter")
    diff = runs.max_abs_diff(two, one)
    assert diff <= 1e-5, f"2 ranks x batch 4 under ZeRO-3 vs 1 process x batch 8: max abs diff {diff:.3g}"
    assert runs.run_record(zero3.output_dir)["world_size"] == 2 and runs.run_record(single.output_dir)["world_size"] == 1


# ---- 2 nodes on one machine


@slow
def test_two_node_rendezvous_matches_one_node(two_nodes, zero3, reference_A):
    assert two_nodes.launch.returncodes == [0, 0]
    assert runs.run_record(two_nodes.output_dir)["world_size"] == 2
    verify_adapter_dir(str(two_nodes.output_dir / "adapter"))
    tensors = runs.adapter_tensors(two_nodes.output_dir / "adapter")
    _assert_trained_asymmetrically(tensors, reference_A, "2-node adapter")
    diff = runs.max_abs_diff(tensors, runs.adapter_tensors(zero3.output_dir / "adapter"))
    assert diff <= 1e-6, f"2 nodes x 1 rank vs 1 node x 2 ranks: max abs diff {diff:.3g}"
    for name in ("checkpoint-4", "checkpoint-8"):
        verify_adapter_dir(str(two_nodes.output_dir / name))
    assert "writable and one folder for all 2 ranks" in two_nodes.launch.log
    assert not [name for name in os.listdir(two_nodes.output_dir) if name.startswith(".asymllm-shared-")]  # markers removed


@slow
def test_two_nodes_whose_output_dir_is_not_one_folder_are_refused_before_the_model_loads(tmp_path, model_dir):
    """Two nodes on one machine, each started in its own folder with a relative --output_dir: the same
    flag names two folders, as a node-local disk at the same path does on a cluster."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    port = runs.free_port()
    commands = [runs.torchrun_command("out", model_dir, nproc=1, port=port, node_args=("--nnodes", "2", "--node_rank", str(node)))
                for node in (0, 1)]
    for folder in nodes:
        folder.mkdir()
    result = runs.launch(commands, tmp_path, env=runs.base_env(ASYMLLM_SHARED_CHECK_SECONDS=1), expect_ok=False,
                         what="torchrun 2 nodes, 2 output folders", cwds=nodes)
    assert result.returncodes[0] != 0 and result.returncodes[1] != 0, result.log[-3000:]
    assert re.search(r"asymllm train: error: rank \d: --output_dir out: not one folder for all 2 ranks: rank \d \(host .*\) "
                     r"cannot see the files rank \d wrote there in 1 s\. .*every node sees", result.log), result.log[-3000:]
    assert "model " + model_dir not in result.log  # refused before the model loaded
    for folder in nodes:
        assert os.listdir(folder / "out") == [], os.listdir(folder / "out")  # nothing trained, no marker left


# ---- the deepspeed launcher, ZeRO-2


@slow
def test_deepspeed_launcher_zero2(deepspeed_zero2, single, reference_A):
    out = deepspeed_zero2.output_dir
    assert "done: 8 steps" in deepspeed_zero2.launch.log
    assert runs.run_record(out)["world_size"] == 2
    for states in runs.deepspeed_model_states(out / "checkpoint-8"):
        assert states["ds_config"]["zero_optimization"]["stage"] == 2 and states["dp_world_size"] == 2
    for name in ("adapter", "checkpoint-4", "checkpoint-8"):
        assert len(verify_adapter_dir(str(out / name))) == runs.N_TENSORS, name
    tensors = runs.adapter_tensors(out / "adapter")
    _assert_trained_asymmetrically(tensors, reference_A, "ZeRO-2 adapter")
    diff = runs.max_abs_diff(tensors, runs.adapter_tensors(single.output_dir / "adapter"))
    assert diff <= 1e-5, f"deepspeed launcher ZeRO-2, 2 ranks vs 1 process: max abs diff {diff:.3g}"


# ---- plain data parallel (DDP), no DeepSpeed: torchrun, accelerate launch, deepspeed launcher


@slow
@pytest.mark.parametrize("launcher", sorted(runs.DATA_PARALLEL_LAUNCHERS))
def test_data_parallel_without_deepspeed_matches_zero3(launcher, tmp_path_factory, zero3, reference_A):
    """Both ranks train one job (not two runs of their own) and rank 0 saves the same complete
    adapter as ZeRO-3 with the same data, seed and global batch (2 ranks x 4)."""
    run = runs.data_parallel(tmp_path_factory, launcher)
    out = run.output_dir
    expected_type = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    for rank in (0, 1):
        assert runs.probe_info(run, rank)["train_end"] == {
            "global_step": runs.MAX_STEPS, "world_size": 2, "distributed_type": expected_type,
            "model_wrapped": "DistributedDataParallel"}, f"{launcher}: rank {rank}"
    assert runs.run_record(out)["world_size"] == 2
    assert f"done: {runs.MAX_STEPS} steps" in run.launch.log
    for name in ("adapter", "checkpoint-4", "checkpoint-8"):
        assert len(verify_adapter_dir(str(out / name))) == runs.N_TENSORS, f"{launcher}: {name}"
        assert not any(p.name.startswith("global_step") for p in (out / name).iterdir()), f"{launcher}: DeepSpeed state in {name}"
    tensors = runs.adapter_tensors(out / "adapter")
    _assert_trained_asymmetrically(tensors, reference_A, f"{launcher} DDP adapter")
    diff = runs.max_abs_diff(tensors, runs.adapter_tensors(zero3.output_dir / "adapter"))
    print(f"{launcher} DDP vs torchrun ZeRO-3, 2 ranks x batch 4: max abs diff {diff:.3g}")
    assert diff <= 1e-6, f"{launcher} DDP vs ZeRO-3, 2 ranks x batch 4 each: max abs diff {diff:.3g}"


# ---- Slurm


SLURM_SCRIPT = runs.REPO / "launch" / "slurm_sft.sbatch"
SLURM_LOG_OPTION = re.compile(r"^#SBATCH\s+(?:--output|--error|-o|-e)[=\s]\s*(\S+)", re.MULTILINE)


def test_slurm_script_parses_and_logs_where_a_fresh_clone_can_write():
    """Slurm opens --output/--error (relative to the submit directory, the checkout) before the
    script runs, so a folder in them must exist in a fresh clone: be tracked by git."""
    subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], check=True)
    logs = SLURM_LOG_OPTION.findall(SLURM_SCRIPT.read_text())
    assert logs, "no #SBATCH --output line"
    for log in logs:
        folder = os.path.dirname(log)
        if folder:
            tracked = subprocess.run(["git", "ls-files", "--", folder], cwd=runs.REPO, capture_output=True, text=True, check=True)
            assert tracked.stdout.strip(), f"#SBATCH --output={log}: {folder}/ is not in a fresh clone"
