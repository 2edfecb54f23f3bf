"""Re-execute chapters in place and store their outputs (what the website shows and nbval compares).

    OMP_NUM_THREADS=1 python scripts/execute_chapters.py book/02_rank_merge.ipynb [more chapters]

Run it on an otherwise idle machine: a loaded machine writes its timings into the outputs, and
the prose may quote them. The checkpoint cache is ``$BACKFILL_CACHE`` (default
``_build/checkpoints``, as in ``scripts/test.sh``), so a warm cache makes this quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="+", type=Path, help="notebooks under book/")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    for path in args.chapters:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"chapters: {path} is not a notebook file")
    os.environ.setdefault("BACKFILL_CACHE", str(ROOT / "_build" / "checkpoints"))
    # Always the inline backend, whatever the shell exports: under MPLBACKEND=Agg (as scripts/test.sh
    # sets for the unit tests) a kernel draws every figure and keeps none, and the committed
    # chapter would lose its figures.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    for path in args.chapters:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.resolve().parent)}}).execute()
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
