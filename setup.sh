#!/usr/bin/env bash
# Creates .venv with the project installed. Safe to rerun: it reinstalls only when
# pyproject.toml or requirements.txt changed.
#   ./setup.sh        runtime only (enough for `python -m cosyvoice demo` and the servers)
#   ./setup.sh --dev  plus the test tools: pytest and friends, MPI wheels, Ray Serve (about
#                     330 MB installed, a minute), Debian's chromium,
#                     ShellCheck and unzip for the browser and installer tests (installed with
#                     apt-get when missing), and the demo bundle's wheelhouse in .venv/wheelhouse
#                     (about 300 MB, fetched once) that the deploy tests install from
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU wheel on dev/CI machines; override for CUDA
extras=""
dev_stamp=""
if [[ "${1:-}" == "--dev" ]]; then
    extras="[test,mpi,ray]"
    dev_stamp=" demo-wheelhouse"
elif [[ $# -gt 0 ]]; then
    echo "usage: ./setup.sh [--dev]" >&2
    exit 2
fi

install_debian_tools() {
    local missing=()
    command -v chromium > /dev/null || missing+=(chromium)
    command -v shellcheck > /dev/null || missing+=(shellcheck)
    command -v unzip > /dev/null || missing+=(unzip)
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
    fi
}

stamp=.venv/.installed
wanted="$(cat pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1) $TORCH_SPEC $extras$dev_stamp"
if [[ -n "$extras" ]]; then
    install_debian_tools
fi
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".${extras}"
if [[ -n "$extras" ]]; then
    .venv/bin/python offline_packages/build.py --demo --fetch-only --wheelhouse .venv/wheelhouse
fi
echo "$wanted" > "$stamp"
