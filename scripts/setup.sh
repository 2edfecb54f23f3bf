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
# Fashion-MNIST, the book's running example: Debian's package holds its four IDX files
# (load_dataset("fashion_mnist") reads them there; $BACKFILL_DATA, if set, is searched first).
FMNIST=/usr/share/datasets/fashion-mnist
fmnist_present() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$FMNIST/$f.gz" ] || [ -f "$FMNIST/$f" ] || return 1
  done
}
if fmnist_present; then
  echo "[setup] Fashion-MNIST: $FMNIST"
else
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "[setup] installing dataset-fashion-mnist with apt-get (log: _build/apt.log)"
  if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist; } >_build/apt.log 2>&1 || ! fmnist_present; then
    tail -30 _build/apt.log
    if elsewhere=$(.venv/bin/python -c 'from backfill_lib.data import find_fashion_mnist as f; print(f()["folder"])' 2>/dev/null); then
      echo "[setup] apt-get failed, but Fashion-MNIST is in $elsewhere: using that" >&2
    else
      echo "[setup] could not install dataset-fashion-mnist (Debian/Ubuntu package, about 31 MB): install it by hand," \
        "or put the four Fashion-MNIST IDX files in a folder and set BACKFILL_DATA to it" >&2
      exit 1
    fi
  else
    echo "[setup] Fashion-MNIST: $FMNIST"
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, faiss; print("torch", torch.__version__, "faiss", faiss.__version__)')"
