#!/usr/bin/env bash
# Creates .venv with the project and its test tools installed. Safe to rerun:
# it reinstalls only when pyproject.toml or requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU wheel on dev/CI machines; override for CUDA
stamp=.venv/.installed
wanted="$(cat pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1) $TORCH_SPEC"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$wanted" > "$stamp"
