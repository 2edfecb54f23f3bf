#!/usr/bin/env bash
# Create .venv (if missing) and install everything the book and the tests need.
# Idempotent: a second run only checks. Set BACKFILL_PYTHON to use another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${BACKFILL_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
mkdir -p _build
echo "[setup] installing requirements (log: _build/pip.log)"
if ! .venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt -e . >_build/pip.log 2>&1; then
  grep -v "is ignored: it is neither" _build/pip.log | tail -40
  echo "[setup] pip install failed" >&2
  exit 1
fi
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "[setup] ready: $(.venv/bin/python -c 'import torch, faiss; print("torch", torch.__version__, "faiss", faiss.__version__)')"
