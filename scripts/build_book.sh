#!/usr/bin/env bash
# Build the book: install what is missing, execute every chapter on the default dataset,
# write HTML to _build/html. Strict: warnings are errors and a failing cell fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export BACKFILL_CACHE=${BACKFILL_CACHE:-$PWD/_build/checkpoints}
export MPLBACKEND=Agg
# One thread, as in the tests: a head trained here and one loaded from the checkpoint cache
# (trained by nbval) then agree to the last digit.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/sync_notebooks.py --check
bash scripts/fetch_site_js.sh  # widget JS and MathJax, served by the site itself (no CDN)
# The kernel that executes the chapters keeps its inline backend: with Agg, every plt.show()
# figure would be missing from the website.
MPLBACKEND=module://matplotlib_inline.backend_inline jupyter-book build . --all -W -n --keep-going
echo "[book] built: _build/html/index.html"
