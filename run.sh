#!/usr/bin/env bash
# The front door. On first use it creates .venv and installs asymllm into it; then:
#   bash run.sh train [flags]    train the built-in default (or anything `asymllm train` takes)
#   bash run.sh test  [pytest args]
#   bash run.sh <any asymllm command> [flags]
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/install.sh >&2
source .venv/bin/activate
case "${1:-}" in
  test) shift; exec python -m pytest -q -ra "$@" ;;
  "")   exec asymllm --help ;;
  *)    exec asymllm "$@" ;;
esac
