#!/usr/bin/env bash
# Creates ./.venv with the CPU stack: torch 2.13.0 first (so pip never pulls a CUDA build),
# then exvae-dist (faiss-cpu included) with the test tools. Safe to rerun.
#   EXVAE_EXTRAS=test (default) | "" (no pytest)
#   EXVAE_FAISS=gpu   swaps faiss-cpu for faiss-gpu (index.use_gpu=true; CUDA 12 runtime);
#                     both provide the `faiss` module, so exactly one may be installed
#   TORCH_VERSION     default 2.13.0; a GPU machine installs a CUDA torch first, or sets
#                     TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXVAE_EXTRAS-test}
FAISS_GPU="faiss-gpu>=1.9,<1.16"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip >/dev/null
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
if [ "${EXVAE_FAISS:-cpu}" = gpu ]; then
  # faiss-gpu and faiss-cpu write the same `faiss` files: remove faiss-cpu (the -e install
  # above puts it back on every rerun), then (re)write faiss-gpu's files over what is left
  "$VENV/bin/python" -m pip uninstall -q -y faiss-cpu
  if "$VENV/bin/python" -m pip show -q faiss-gpu 2>/dev/null; then
    "${PIP[@]}" --force-reinstall --no-deps "$FAISS_GPU"
  else
    "${PIP[@]}" "$FAISS_GPU"
  fi
fi
"$VENV/bin/python" - <<'PY'
import faiss, torch
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(f"exvae-dist installed: torch {torch.__version__}, faiss {faiss.__version__} "
      f"({'GPU, %d devices' % gpus if hasattr(faiss, 'StandardGpuResources') else 'CPU'})")
PY
