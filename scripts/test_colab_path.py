"""The Colab path, as a test: every chapter runs top to bottom from a plain install of the wheel.

Colab installs ``backfill_lib`` with ``pip install "backfill_lib @ git+…"``: a non-editable install,
in a folder with no repository files. The editable install of ``.venv`` hides packaging mistakes
(a subpackage or a data file left out of the wheel still imports from the checkout), so this test
does what Colab does:

1. build the wheel (``pip wheel --no-deps``) from a clean copy of the repository (the files git
   tracks or would track; no ``build/``, no ``*.egg-info``) and check that it holds every module of
   ``backfill_lib/`` and every committed result file of ``results/`` (as ``backfill_lib/_results/``);
2. for each chapter of ``_toc.yml``: create a fresh virtual environment that reuses the packages of
   the interpreter running this script (a ``.pth`` file names a folder of links to them, leaving
   out ``backfill_lib`` and every editable-install finder, so nothing resolves to the checkout),
   check that ``backfill_lib`` is not importable there, register a kernel for it, copy the
   notebook alone into an empty folder and execute it there with ``BACKFILL_INSTALL=<the wheel>``:
   the bootstrap cell (``scripts/sync_notebooks.py``) then installs the wheel, offline
   (``PIP_NO_INDEX``);
3. a cell appended to each copy checks, in the notebook's own process, that ``backfill_lib`` and
   the committed results it read come from the fresh environment.

Run it with the interpreter of ``.venv`` (``scripts/test.sh`` does, after the unit tests)::

    .venv/bin/python scripts/test_colab_path.py                   # every chapter of _toc.yml
    .venv/bin/python scripts/test_colab_path.py book/02_*.ipynb   # some chapters
    .venv/bin/python scripts/test_colab_path.py --keep            # keep the temporary folder

Exit status 1 if any check fails. Models are trained in a temporary ``BACKFILL_CACHE`` shared by
the chapters of one run, or in ``--cache DIR``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from sync_notebooks import chapters  # noqa: E402  (the chapters of _toc.yml: one definition)

KERNEL = "backfill-colab-path"
CELL_TIMEOUT = 1800  # seconds, as in _config.yml
MARK = "COLAB-PATH-CHECK "
# Left out of the reused packages: the library itself and every editable-install finder.
HIDDEN = ("backfill_lib", "backfill_lib-*", "backfill_lib.*", "__editable__*", "*.pth")

CHECK_CELL = f"""\
# Appended by scripts/test_colab_path.py: where did backfill_lib and the results come from?
import json, sys
import backfill_lib, backfill_lib.book
print({MARK!r} + json.dumps({{"prefix": sys.prefix, "file": backfill_lib.__file__,
                              "results": str(backfill_lib.book.results_dir())}}))
"""


def log(msg: str) -> None:
    print(f"[colab-path] {msg}", flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res.stdout}{res.stderr}")
    return res


def source_files() -> list[str]:
    """The repository's files as a fresh clone (plus not-yet-committed new files) would have them."""
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    # No build isolation: setuptools comes from this environment, so the build needs no network.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", tmp / "wheel", src])
    wheels = list((tmp / "wheel").glob("backfill_lib-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one backfill_lib wheel, found {wheels}")
    return wheels[0]


def missing_from_wheel(wheel: Path, src: Path) -> list[str]:
    """Modules of backfill_lib/ and committed results/ files the wheel does not hold."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = [p.relative_to(src).as_posix() for p in (src / "backfill_lib").rglob("*.py")]
    want += [f"backfill_lib/_results/{p.name}" for p in (src / "results").iterdir()
             if p.suffix in (".json", ".md")]
    return sorted(w for w in want if w not in names)


def make_venv(venv: Path) -> Path:
    """A fresh environment reusing this interpreter's packages, with no backfill_lib; its site-packages."""
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                    ).stdout.strip())
    links = venv / "reused-packages"
    links.mkdir()
    for base in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        for entry in Path(base).iterdir():
            if not any(fnmatch.fnmatch(entry.name, pat) for pat in HIDDEN) and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
    # A path line in a .pth adds the folder to sys.path without processing the .pth files in it.
    (site / "reused-packages.pth").write_text(f"{links}\n")
    found = run([venv / "bin" / "python", "-c",
                 "import importlib.util as u; print(u.find_spec('backfill_lib'), u.find_spec('faiss') is not None)"],
                cwd=venv).stdout.split()
    if found != ["None", "True"]:
        raise RuntimeError(f"the fresh environment must see faiss and no backfill_lib, got {found}")
    run([venv / "bin" / "python", "-m", "ipykernel", "install", "--prefix", venv, "--name", KERNEL,
         "--display-name", "Colab path"])
    return site


def chapter_env(venv: Path, wheel: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "BACKFILL_RESULTS", "PYTHONHOME")}
    env.update(BACKFILL_INSTALL=str(wheel), BACKFILL_CACHE=str(cache), MPLBACKEND="Agg",
               OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               JUPYTER_PATH=str(venv / "share" / "jupyter"),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def run_chapter(notebook: Path, wheel: Path, tmp: Path, cache: Path) -> str | None:
    """Execute one chapter the Colab way; None if it passed, else what failed."""
    venv = tmp / f"venv-{notebook.stem}"
    site = make_venv(venv)
    work = tmp / f"chapter-{notebook.stem}"
    work.mkdir()
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    env = chapter_env(venv, wheel, cache)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel spec is looked up in JUPYTER_PATH; the kernel inherits env
    bar = tqdm(total=sum(c.cell_type == "code" for c in nb.cells), desc=notebook.stem, unit="cell",
               leave=False, file=sys.stdout, mininterval=10)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(work)}},
                            on_cell_executed=lambda cell, **_: bar.update(cell.cell_type == "code"))
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        where = f"cell {failed} (id {nb.cells[failed].get('id')})" if failed is not None else "a cell"
        return f"{where} raised {exc.ename}: {exc.evalue}"
    except (CellTimeoutError, DeadKernelError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        bar.close()
        os.environ.clear()
        os.environ.update(saved)
        nbformat.write(nb, tmp / f"executed-{notebook.name}")
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    line = next((ln for ln in text.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        return f"the check cell printed no {MARK.strip()} line: {text!r}"
    got = json.loads(line[len(MARK):])
    problems = []
    if Path(got["prefix"]).resolve() != venv.resolve():
        problems.append(f"the kernel ran in {got['prefix']}, not in the fresh environment {venv}")
    if not Path(got["file"]).resolve().is_relative_to(site.resolve()):
        problems.append(f"backfill_lib was imported from {got['file']}, not from the wheel installed in {site}")
    if Path(got["results"]).resolve() != (site / "backfill_lib" / "_results").resolve():
        problems.append(f"the results were read from {got['results']}, not from the installed package")
    return "; ".join(problems) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="chapters to run (default: every chapter of _toc.yml)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (executed notebooks, venvs)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="checkpoint folder the chapters share (default: a new empty one in the temporary folder); "
                         "scripts/test.sh passes the project's, so that nbval and the build reuse what this run "
                         "trained (on a fresh clone it starts empty, as Colab does)")
    args = ap.parse_args(argv)
    todo = [p.resolve() for p in args.notebooks] or chapters()
    if not todo:
        log("no chapter notebook found in _toc.yml")
        return 1
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="colab-path-"))
    if tmp.resolve().is_relative_to(ROOT):
        raise SystemExit("the temporary folder must be outside the repository")
    failures = {}
    try:
        log("building the wheel from a clean copy of the repository")
        wheel = build_wheel(tmp)
        names = zipfile.ZipFile(wheel).namelist()
        pkgs = sorted({n.rsplit("/", 1)[0].replace("/", ".") for n in names if not n.split("/")[0].endswith(".dist-info")})
        log(f"{wheel.name}: {len(names)} files, packages {', '.join(pkgs)} ({time.perf_counter() - start:.0f} s)")
        missing = missing_from_wheel(wheel, tmp / "src")
        if missing:
            failures["the wheel"] = f"missing {len(missing)} files: {', '.join(missing)}"
            log(f"FAIL the wheel lacks {', '.join(missing)}")
        cache = args.cache.resolve() if args.cache is not None else tmp / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        for nb in todo:
            rel = nb.relative_to(ROOT).as_posix() if nb.is_relative_to(ROOT) else str(nb)
            t0 = time.perf_counter()
            problem = run_chapter(nb, wheel, tmp, cache)
            took = time.perf_counter() - t0
            if problem:
                failures[rel] = problem
                log(f"FAIL {rel} ({took:.0f} s): {problem}")
            else:
                log(f"ok   {rel} ({took:.0f} s): every cell ran, backfill_lib and results/ from the installed wheel")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - start
    if failures:
        log(f"{len(failures)} failed ({', '.join(failures)}) in {total:.0f} s")
        return 1
    log(f"all {len(todo)} chapters passed from the wheel in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
