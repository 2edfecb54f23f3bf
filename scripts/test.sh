#!/usr/bin/env bash
# Run every test: install what is missing, unit tests, the Colab path (every chapter from the built
# wheel in a fresh venv), nbval over book/, the strict build, then
# the built website in headless Chromium (tests/browser; screenshots in _build/screenshots).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export BACKFILL_CACHE=${BACKFILL_CACHE:-$PWD/_build/checkpoints}
export MPLBACKEND=Agg
# Two pytest workers share 2 cores: one torch/OpenMP thread each, or they oversubscribe the
# cores and every training step slows down many times over.
echo "[test] unit tests"
OMP_NUM_THREADS=1 python -m pytest tests backfill_lib --doctest-modules -n 2 -q
echo "[test] the Colab path"
# The Colab path trains into the project's cache (empty on a fresh clone, as in Colab), so that
# nbval and the build below load those models instead of training them twice more.
OMP_NUM_THREADS=1 python scripts/test_colab_path.py --cache "$BACKFILL_CACHE"
echo "[test] nbval over book/"
OMP_NUM_THREADS=1 python -m pytest --nbval-lax --nbval-current-env book/ -n 2 --dist loadscope -q -p no:cacheprovider
echo "[test] strict book build"
bash scripts/build_book.sh
echo "[test] the website in headless Chromium"
bash scripts/install_browser.sh
python -m pytest tests/browser --site _build/html -q -p no:cacheprovider
echo "[test] all passed in $(( $(date +%s) - start )) s"
