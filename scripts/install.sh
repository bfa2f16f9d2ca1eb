#!/usr/bin/env bash
# Create .venv and install capworks with everything it needs, on a CPU machine, without
# pulling CUDA wheels: torch 2.13.0 first, then fairseq-fixed built against it (no build
# isolation, which would download the newest CUDA torch just to compile it), then the rest.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CAPWORKS_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
stamp="$VENV/.capworks-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" cython numpy "setuptools<81" wheel
    "$VENV/bin/python" -c "import fairseq" 2>/dev/null \
        || "${PIP[@]}" --no-build-isolation "fairseq-fixed==0.12.3.1"
    "${PIP[@]}" -e ".[dev]"
    touch "$stamp"
fi
