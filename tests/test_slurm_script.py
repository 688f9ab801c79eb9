"""launch/slurm_sft.sbatch's own logic with a fake srun, scontrol and torchrun (the real run under
it: tests/test_faults.py): the GPU count from #SBATCH --gpus-per-node alone, plain DDP with
DS_CONFIG=none, a rendezvous port per job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm_sft.sbatch"


@pytest.fixture
def fake_slurm(tmp_path):
    """srun that runs its command here; torchrun that records its arguments and exits 0."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "torchrun_args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho node7\n')
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {calls}\n')
    for name in ("srun", "scontrol", "torchrun"):
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def run_script(fake_slurm, tmp_path, **env):
    bin_dir, calls = fake_slurm
    environment = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "MASTER_PORT", "DS_CONFIG")}
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="123457",
                       SLURM_JOB_NODELIST="node[7-8]", SLURM_NNODES="2", VENV=str(tmp_path / "no-venv"), **env)
    done = subprocess.run(["bash", str(SCRIPT), "--config", "launch/run.example.yaml"], env=environment,
                          capture_output=True, text=True, timeout=60)
    return done, (calls.read_text().splitlines() if calls.exists() else None)


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_gpu_count_comes_from_gpus_per_node_and_the_port_from_the_job_id(fake_slurm, tmp_path):
    done, args = run_script(fake_slurm, tmp_path, SLURM_GPUS_PER_NODE="a100:4")
    assert done.returncode == 0, done.stderr
    assert value(args, "--nproc_per_node") == "4" and value(args, "--nnodes") == "2"
    assert value(args, "--rdzv_endpoint") == f"node7:{20000 + 123457 % 20000}"
    assert value(args, "--deepspeed") == "ds_configs/zero3.json"  # ZeRO-3 by default
    assert args[-4:] == ["--resume_from_checkpoint", "auto", "--config", "launch/run.example.yaml"]


def test_ds_config_none_runs_plain_ddp(fake_slurm, tmp_path):
    done, args = run_script(fake_slurm, tmp_path, SLURM_GPUS_PER_NODE="8", DS_CONFIG="none")
    assert done.returncode == 0, done.stderr
    assert "--deepspeed" not in args and value(args, "--nproc_per_node") == "8"


def test_no_gpu_count_is_refused_with_the_line_to_add(fake_slurm, tmp_path):
    done, args = run_script(fake_slurm, tmp_path)
    assert done.returncode == 2 and args is None
    assert "set #SBATCH --gpus-per-node=N, or GPUS_PER_NODE=N" in done.stderr
