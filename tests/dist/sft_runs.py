"""Launching real `launch/sft.py` training runs from tests: one process, torchrun (one or
several "nodes" on 127.0.0.1), the deepspeed launcher, accelerate launch; plus what the
tests compare.

Imported by tests/test_train_distributed.py and tests/test_resume.py (both put this folder
on sys.path). Runs that both files need (the uninterrupted single-process and 2-rank
ZeRO-3 runs) are made once per pytest session through `shared()`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SFT = str(REPO / "launch" / "sft.py")
PROBE = str(REPO / "tests" / "dist" / "sft_probe.py")
TIMEOUT_S = 300

SEED = 1234            # not the default (42): a seed that is not passed on would show
RECIPE = "A_rand_hB_zero"
R, ALPHA = 16, 32      # asymllm train's defaults, spelled out for the reference build
N_TENSORS = 2 * 7 * 2  # A and B x 7 projections x 2 layers of asymllm.tiny's Llama
MAX_STEPS, SAVE_STEPS = 8, 4
GLOBAL_BATCH = 8
COMMON = ["--recipe", RECIPE, "--seed", str(SEED), "--lora_dropout", "0",
          "--max_steps", str(MAX_STEPS), "--logging_steps", "4", "--save_strategy", "steps",
          "--save_steps", str(SAVE_STEPS), "--eval_strategy", "no", "--per_device_eval_batch_size", "64"]

_SHARED: dict = {}


def shared(key: str, make):
    """`make()` once per pytest session (both test files import this same module)."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(tmp_path_factory) -> str:
    def make():
        from asymllm.tiny import save_tiny_model

        return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))
    return shared("tiny_model", make)


def zero3_config(tmp_path_factory) -> str:
    """ds_configs/zero3.json with stage3_param_persistence_threshold 0: otherwise a tiny
    model's parameters all stay unpartitioned and nothing is proved."""
    def make():
        config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = tmp_path_factory.mktemp("dsconfig") / "zero3_tiny.json"
        path.write_text(json.dumps(config, indent=2))
        return str(path)
    return shared("zero3_config", make)


def base_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)   # a test process must not hand its own distributed identity down
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Launch:
    """One finished launch: exit codes and the combined output of each process started."""
    returncodes: list[int]
    logs: list[str]
    seconds: float

    @property
    def log(self) -> str:
        return "\n".join(self.logs)


def launch(commands: list[list[str]], log_dir: Path, env: dict | None = None, expect_ok: bool = True,
           what: str = "launch", cwds: list | None = None) -> Launch:
    """Start every command at once (a multi-node job needs all its nodes up), wait for all.

    `cwds`: each command's working directory (default: the repository), e.g. two "nodes" whose
    relative --output_dir names two different folders.
    Output goes to files (no pipe can fill up and stall a rank). On a timeout every process
    group started here is killed; on failure the test fails with each output's tail.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = env or base_env()
    start = time.perf_counter()
    procs, paths = [], []
    for i, command in enumerate(commands):
        path = log_dir / f"{what.replace(' ', '_')}.{i}.log"
        with open(path, "w") as out:
            procs.append(subprocess.Popen(command, cwd=cwds[i] if cwds else REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        paths.append(path)
    timed_out = False
    deadline = start + TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = Launch([p.returncode for p in procs], [p.read_text(errors="replace") for p in paths],
                    time.perf_counter() - start)
    if timed_out or (expect_ok and any(rc != 0 for rc in result.returncodes)):
        why = f"timed out after {TIMEOUT_S} s" if timed_out else f"exit codes {result.returncodes}"
        tails = "\n".join(f"--- {' '.join(c)}\n--- output tail (rc={rc}):\n{log[-6000:]}"
                          for c, rc, log in zip(commands, result.returncodes, result.logs))
        pytest.fail(f"{what} {why}:\n{tails}", pytrace=False)
    return result


def single_command(output_dir, model_dir, *extra, script=SFT) -> list[str]:
    return [sys.executable, script, "--model", model_dir, "--output_dir", str(output_dir), *COMMON, *extra]


def torchrun_command(output_dir, model_dir, *extra, nproc=2, port=None, node_args=(), script=SFT) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *node_args,
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            script, "--model", model_dir, "--output_dir", str(output_dir), *COMMON, *extra]


def deepspeed_command(output_dir, model_dir, *extra, nproc=2, script=SFT) -> list[str]:
    """`deepspeed --num_gpus N script ...`; without GPUs it still starts N local ranks (DeepSpeed's CPU accelerator)."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(free_port()),
            script, "--model", model_dir, "--output_dir", str(output_dir), *COMMON, *extra]


def accelerate_command(output_dir, model_dir, *extra, nproc=2, script=SFT) -> list[str]:
    """`accelerate launch --multi_gpu`, accelerate's torchrun path. With GPUs, --num_processes > 1
    alone selects it; without, it must be named. Every setting is passed, so no accelerate
    config file of the machine's user takes part."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            script, "--model", model_dir, "--output_dir", str(output_dir), *COMMON, *extra]


# ---- reading what a run left


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def factor_keys(tensors: dict, factor: str) -> list[str]:
    return sorted(k for k in tensors if f".{factor}." in k)


def reference_A(model_dir: str) -> dict[str, torch.Tensor]:
    """The frozen A every run must end with: the same tiny base and recipe built here, in one
    process, without DeepSpeed (rand A depends only on the seed and the module name)."""
    def make():
        from transformers import AutoModelForCausalLM

        from asymllm import LoRASYMConfig, get_lorasym_model, lora_layers

        model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                  LoRASYMConfig(recipe=RECIPE, r=R, lora_alpha=ALPHA, seed=SEED))
        return {f"{name}.lora_A.weight": layer.lora_A["default"].weight.detach().clone()
                for name, layer in lora_layers(model)}
    return shared(f"reference_A:{model_dir}", make)


def run_record(output_dir) -> dict:
    return json.loads((Path(output_dir) / "asymllm_run.json").read_text())


def deepspeed_model_states(checkpoint_dir) -> list[dict]:
    """The DeepSpeed model-state files the Trainer wrote into checkpoint-N/global_stepN/."""
    (step_dir,) = [p for p in Path(checkpoint_dir).iterdir() if p.is_dir() and p.name.startswith("global_step")]
    return [torch.load(p, map_location="cpu", weights_only=False) for p in sorted(step_dir.glob("*model_states.pt"))]


RESTORED = re.compile(r"resume: (\d+) frozen factor tensors restored from (\S+) \(rebuilt values differed by at most ([^)]+)\)")


# ---- the runs both test files need


@dataclass
class Run:
    output_dir: Path
    launch: Launch


def uninterrupted_single(tmp_path_factory) -> Run:
    """One process, batch 8: the reference for the 2-rank runs (same global batch) and for resume."""
    def make():
        out = tmp_path_factory.mktemp("single") / "out"
        model = tiny_model_dir(tmp_path_factory)
        result = launch([single_command(out, model, "--per_device_train_batch_size", str(GLOBAL_BATCH))], out.parent,
                        what="single process")
        return Run(out, result)
    return shared("uninterrupted_single", make)


def uninterrupted_zero3(tmp_path_factory) -> Run:
    """2 ranks under ZeRO-3 (torchrun), batch 4 per rank, through sft_probe.py (which records
    what each rank holds locally; training is launch/sft.py's)."""
    def make():
        out = tmp_path_factory.mktemp("zero3") / "out"
        model, config = tiny_model_dir(tmp_path_factory), zero3_config(tmp_path_factory)
        command = torchrun_command(out, model, "--per_device_train_batch_size", str(GLOBAL_BATCH // 2),
                                   "--deepspeed", config, script=PROBE)
        result = launch([command], out.parent, env=base_env(ASYMLLM_PROBE_DIR=out.parent / "probe"),
                        what="torchrun 2 ranks ZeRO-3")
        return Run(out, result)
    return shared("uninterrupted_zero3", make)


DATA_PARALLEL_LAUNCHERS = {"torchrun": torchrun_command, "accelerate": accelerate_command, "deepspeed": deepspeed_command}


def data_parallel(tmp_path_factory, launcher: str) -> Run:
    """2 ranks of plain data parallel (DDP, no --deepspeed), batch 4 per rank: the ZeRO-3 run's
    global batch; through sft_probe.py, which records how each rank trained."""
    def make():
        out = tmp_path_factory.mktemp("ddp_" + launcher) / "out"
        command = DATA_PARALLEL_LAUNCHERS[launcher](out, tiny_model_dir(tmp_path_factory),
                                                    "--per_device_train_batch_size", str(GLOBAL_BATCH // 2), script=PROBE)
        result = launch([command], out.parent, env=base_env(ASYMLLM_PROBE_DIR=out.parent / "probe"),
                        what=f"{launcher} 2 ranks DDP")
        return Run(out, result)
    return shared(f"data_parallel:{launcher}", make)


def probe_info(run: Run, rank: int) -> dict:
    return json.loads((run.output_dir.parent / "probe" / f"rank{rank}.json").read_text())


# ---- a launch with a fault delivered while it runs


@dataclass
class FaultedLaunch:
    launch: Launch
    fault_at: float                          # seconds after the start when the fault was delivered
    seen_at: dict[str, float]                # log pattern -> seconds after the start when it first appeared


def launch_with_fault(command: list[str], log_dir: Path, env: dict, pause_dir: Path, fault, watch: tuple[str, ...] = (),
                      what: str = "faulted launch") -> FaultedLaunch:
    """Start `command`; once a rank has paused (tests/dist/sft_probe.py writes pause_dir/paused.json)
    call `fault(process, paused)`, e.g. a SIGTERM to the launcher or a SIGKILL to the paused rank;
    wait for the end. The times at which the `watch` patterns first appear in the output say how
    long the job took from the fault to stopping or continuing."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{what.replace(' ', '_')}.log"
    start = time.perf_counter()
    fault_at, seen = None, {}
    with open(path, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and time.perf_counter() - start < TIMEOUT_S:
            if fault_at is None and (pause_dir / "paused.json").exists():
                fault(proc, json.loads((pause_dir / "paused.json").read_text()))
                fault_at = time.perf_counter() - start
            text = path.read_text(errors="replace")
            seen.update({p: time.perf_counter() - start for p in watch if p not in seen and p in text})
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{what} timed out after {TIMEOUT_S} s:\n{path.read_text(errors='replace')[-6000:]}", pytrace=False)
    text = path.read_text(errors="replace")
    seen.update({p: time.perf_counter() - start for p in watch if p not in seen and p in text})
    if fault_at is None:
        pytest.fail(f"{what}: no rank paused, so no fault was delivered (rc {proc.returncode}):\n{text[-6000:]}", pytrace=False)
    return FaultedLaunch(Launch([proc.returncode], [text], time.perf_counter() - start), fault_at, seen)
