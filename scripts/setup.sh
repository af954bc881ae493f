#!/usr/bin/env bash
# Creates ./.venv with the CPU stack: torch 2.13.0 first (so pip never pulls a CUDA build),
# then exvae-dist with faiss-cpu and the test tools. Safe to rerun.
# GPU machines: EXVAE_EXTRAS=gpu,test bash scripts/setup.sh (and a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXVAE_EXTRAS:-cpu,test}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
echo "exvae-dist installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
