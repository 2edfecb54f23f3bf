"""Write the student edition of the book: every chapter without its solutions and outputs.

    python scripts/student_edition.py --out DIR

For each notebook chapter of ``_toc.yml``, in the toc's order, it writes ``DIR/book/<chapter>.ipynb``
with

- every cell tagged ``solution`` removed (the folded solution and the code cells that measure
  its number; see /work/notes/BOOK_CONVENTIONS.md), found by the tag only, never by guessing;
- every output, execution count and widget state removed, so the student runs the notebook
  top to bottom and sees only what they ran;
- the Colab badge cell (id ``colab-badge``) removed: it opens the full edition on GitHub.

Exercise cells (tag ``exercise``) and every other cell stay, in order. The local files the
notebooks need (images shown in Markdown, paths named by string literals in code, e.g.
``"../results/x.json"``) are copied under ``DIR`` at their place relative to the repository, so
the same relative paths work; nothing else is copied. Committed results read through
``backfill_lib.book.load_result`` come with the installed library and need no copy.

The script refuses to write into the book's own ``book/`` folder (it would overwrite the
chapters) or into the repository root, also through a symbolic link (on the output path, inside
an existing output folder, or on the way to any file it writes), before writing anything; and it
stops with an error if a chapter breaks the rules the student edition relies on: a solution admonition in a cell not tagged ``solution`` (it would
leak), or a later cell using a name that only a ``solution`` cell defines (the student notebook
would fail there).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"
BADGE_ID = "colab-badge"

# A MyST admonition titled "Solution", fenced with backticks or colons.
_SOLUTION_ADMONITION = re.compile(r"^\s*(`{3,}|:{3,})\s*\{admonition\}\s*Solution\b", re.MULTILINE | re.IGNORECASE)
# Images a Markdown cell shows: ![alt](path), <img src="path">, {figure}/{image} path. (Plain links,
# e.g. to another page of the book, are not needed to run the notebook.)
_MARKDOWN_PATHS = (
    re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),
    re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.IGNORECASE),
    re.compile(r"^\s*(?:`{3,}|:{3,})\s*\{(?:figure|image)\}\s+(\S+)", re.MULTILINE),
)
# Never copied even when a notebook names them: the environment and build products.
_IGNORED_PARTS = {".git", ".venv", "_build", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}


def toc_chapters(toc: Path) -> list[Path]:
    """The notebook chapters of a Jupyter Book toc, in reading order.

    Parameters
    ----------
    toc : Path
        The ``_toc.yml``; its entries are paths relative to its folder, without suffix.

    Returns
    -------
    list of Path
        The ``.ipynb`` files of the toc (Markdown pages such as the glossary are left out).
    """
    root = toc.parent
    data = yaml.safe_load(toc.read_text(encoding="utf-8"))
    entries: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    entries.append(node[key])
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    chapters = []
    for entry in entries:
        stem = root / entry
        if stem.with_suffix(".ipynb").is_file():
            chapters.append(stem.with_suffix(".ipynb"))
        elif not (stem.with_suffix(".md").is_file() or stem.is_file()):
            raise FileNotFoundError(f"{toc} lists {entry!r}, but neither {entry}.ipynb nor {entry}.md exists")
    return chapters


def is_solution(cell) -> bool:
    """Whether a notebook cell is tagged ``solution``.

    Parameters
    ----------
    cell : nbformat.NotebookNode
        One cell.

    Returns
    -------
    bool
    """
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def _python_source(source: str) -> str:
    # IPython magics and shell escapes are not Python: keep the line count, drop their text.
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines())


def _names(source: str) -> tuple[set[str], set[str]] | None:
    """(names the code binds, names it reads), or None if it is not parseable Python."""
    try:
        tree = ast.parse(_python_source(source))
    except SyntaxError:
        return None
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return bound, read


def _describe(index: int, cell) -> str:
    return f"cell {index}" + (f" (id {cell['id']})" if cell.get("id") else "")


def check_chapter(nb, name: str = "notebook") -> None:
    """Check that removing the solution cells leaves a notebook that leaks nothing and runs.

    Parameters
    ----------
    nb : nbformat.NotebookNode
        The chapter, with its solutions.
    name : str, default "notebook"
        Its name, for the error messages.

    Raises
    ------
    ValueError
        If a cell not tagged ``solution`` holds a solution admonition, or if a cell not tagged
        ``solution`` reads a name (without assigning it itself) that a ``solution`` cell assigned
        last.
    """
    last_binder: dict[str, int] = {}  # name -> index of the cell that bound it last
    for index, cell in enumerate(nb.cells):
        solution = is_solution(cell)
        if cell.cell_type == "markdown" and not solution and _SOLUTION_ADMONITION.search(cell.source):
            raise ValueError(f"{name}, {_describe(index, cell)}: a 'Solution' admonition in a cell not tagged "
                             f"{SOLUTION_TAG!r}; tag the cell {SOLUTION_TAG!r} so the student edition drops it")
        if cell.cell_type != "code":
            continue
        names = _names(cell.source)
        if names is None:
            continue
        bound, read = names
        if not solution:
            # A name last bound by a solution cell: missing in the student edition, or holding
            # another value there (a solution that re-assigns a name changes what later cells see).
            from_solution = sorted(n for n in read - bound
                                   if n in last_binder and is_solution(nb.cells[last_binder[n]]))
            if from_solution:
                where = last_binder[from_solution[0]]
                raise ValueError(f"{name}, {_describe(index, cell)} uses {', '.join(from_solution)}, last assigned "
                                 f"by the solution {_describe(where, nb.cells[where])}: a cell tagged "
                                 f"{SOLUTION_TAG!r} must not define anything a later cell uses (the student "
                                 f"edition drops it)")
        for n in bound:
            last_binder[n] = index


def student_notebook(nb, name: str = "notebook"):
    """The student version of one chapter.

    Parameters
    ----------
    nb : nbformat.NotebookNode
        The chapter, with solutions and outputs; not modified.
    name : str, default "notebook"
        Its name, for the error messages of :func:`check_chapter`.

    Returns
    -------
    nbformat.NotebookNode
        A copy without ``solution`` cells, without the Colab badge cell, and without outputs,
        execution counts, execution timings and widget state.
    """
    check_chapter(nb, name)
    out = nbformat.from_dict(nb)  # a deep copy
    out.cells = [c for c in out.cells if not is_solution(c) and c.get("id") != BADGE_ID]
    for cell in out.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    out.metadata.pop("widgets", None)
    return out


def _candidate_paths(nb) -> set[str]:
    found: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for pattern in _MARKDOWN_PATHS:
                found.update(m.group(1) for m in pattern.finditer(cell.source))
        elif cell.cell_type == "code":
            try:
                tree = ast.parse(_python_source(cell.source))
            except SyntaxError:
                continue
            found.update(node.value for node in ast.walk(tree)
                         if isinstance(node, ast.Constant) and isinstance(node.value, str)
                         and 0 < len(node.value) < 300 and "\n" not in node.value)
    return found


def needed_files(nb, notebook_dir: Path, root: Path) -> list[Path]:
    """The local files and folders a chapter refers to, which a student copy must bring along.

    A string is a reference when it names an existing file or folder relative to the chapter's
    folder (the working directory of a notebook) inside ``root``: a Markdown image, or a string
    literal in a code cell. The chapters themselves, ``root`` and the chapter's own
    folder are never returned, nor anything in the environment or the build folder.

    Parameters
    ----------
    nb : nbformat.NotebookNode
        The chapter.
    notebook_dir : Path
        The folder the chapter lives in.
    root : Path
        The repository root; nothing outside it is returned.

    Returns
    -------
    list of Path
        Resolved paths, sorted.
    """
    root, notebook_dir = root.resolve(), notebook_dir.resolve()
    needed = set()
    for text in _candidate_paths(nb):
        if re.match(r"^[a-z][a-z0-9+.-]*:", text, re.IGNORECASE) or text.startswith(("#", "/")):
            continue  # a URL, an anchor, an absolute path: not ours to copy
        try:
            path = (notebook_dir / text.split("#")[0]).resolve()
            exists = path.exists()
        except (OSError, ValueError):
            continue
        if not exists or path in (root, notebook_dir) or not path.is_relative_to(root):
            continue
        if _IGNORED_PARTS & set(path.relative_to(root).parts) or path.suffix == ".ipynb":
            continue
        needed.add(path)
    return sorted(needed)


def _book_folders(root: Path) -> set[Path]:
    """The book folders the edition must never write into: the toc's ``book/`` and this repository's."""
    return {(root / "book").resolve(), (ROOT / "book").resolve()}


def _refuse(out: Path, root: Path) -> None:
    """Refuse an output folder that is, or (through a symbolic link on its path) resolves into, a book folder."""
    for forbidden in _book_folders(root):
        if out == forbidden or out.is_relative_to(forbidden):
            raise ValueError(f"--out {out} is inside the book's own folder {forbidden}: the student edition "
                             f"would overwrite the chapters; choose a folder outside it, e.g. --out student_edition")
    if out in (root.resolve(), ROOT):
        raise ValueError(f"--out {out} is the repository root; choose a new folder, e.g. --out student_edition")


def _refuse_links_inside(out: Path, root: Path) -> None:
    """Refuse an existing output folder holding a symbolic link into a book folder.

    Writing through such a link (``out/book -> <repo>/book``) would overwrite the chapters the
    edition is made from, although ``out`` itself lies elsewhere.
    """
    if not out.is_dir():
        return
    forbidden = _book_folders(root)
    for folder, dirs, files in os.walk(out, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            hit = next((f for f in forbidden if target == f or target.is_relative_to(f) or f.is_relative_to(target)),
                       None)
            if hit is not None:
                raise ValueError(f"--out {out} holds the symbolic link {path} -> {target}, which leads into the "
                                 f"book's own folder {hit}: the student edition would overwrite the chapters "
                                 "through it; remove the link or choose an empty folder")


def _refuse_targets(plan: list[tuple[Path, Path]], root: Path) -> None:
    """Refuse a write whose destination resolves into a book folder or onto a file it copies from.

    ``plan`` holds ``(source, destination)`` pairs of files. A symbolic link on a destination's
    path (``out/results -> <repo>/results``) would make the copy overwrite its own source.
    """
    forbidden = _book_folders(root)
    for source, dest in plan:
        target = dest.resolve()
        hit = next((f for f in forbidden if target == f or target.is_relative_to(f)), None)
        if hit is not None:
            raise ValueError(f"--out: writing {dest} would write {target}, inside the book's own folder {hit} "
                             "(through a symbolic link): remove the link or choose another folder")
        if target == source.resolve():
            raise ValueError(f"--out: writing {dest} would overwrite its own source {source} (through a symbolic "
                             "link): remove the link or choose another folder")


def write_student_edition(out: Path, toc: Path = ROOT / "_toc.yml") -> list[Path]:
    """Write the student edition of every chapter of ``toc`` under ``out``.

    Parameters
    ----------
    out : Path
        The folder to write; created if missing. Chapters go to ``out/<path in the repository>``
        (``out/book/01_....ipynb``) and the files they need to their place relative to the
        repository.
    toc : Path, default the repository's ``_toc.yml``
        The table of contents; its folder is the repository root.

    Returns
    -------
    list of Path
        The notebooks written, in toc order.

    Raises
    ------
    ValueError
        If ``out`` is the book's ``book/`` folder (or inside it, also through a symbolic link on
        its path) or the repository root; if ``out`` already holds a symbolic link into a book
        folder, or a file would be written through a link into a book folder or onto its own
        source; or if a chapter fails :func:`check_chapter`. Nothing is written then.
    """
    toc = Path(toc).resolve()
    root = toc.parent
    out = Path(out).expanduser().resolve()  # a symbolic link on the way is followed, then checked
    _refuse(out, root)
    _refuse_links_inside(out, root)
    chapters = toc_chapters(toc)
    # Check every chapter and every destination before writing anything, so a failure leaves no
    # half edition and nothing is written through a symbolic link into the book.
    originals = [nbformat.read(ch, as_version=4) for ch in chapters]
    students = [student_notebook(nb, ch.relative_to(root).as_posix()) for nb, ch in zip(originals, chapters)]
    needs = [needed_files(nb, ch.parent, root) for nb, ch in zip(originals, chapters)]
    plan = [(ch, out / ch.relative_to(root)) for ch in chapters]
    for paths in needs:
        for path in paths:
            files = [path] if not path.is_dir() else \
                [f for f in path.rglob("*") if f.is_file() and not _IGNORED_PARTS & set(f.relative_to(path).parts)]
            plan += [(f, out / f.relative_to(root)) for f in files]
    _refuse_targets(plan, root)
    written = []
    for chapter, student, paths in zip(chapters, students, needs):
        target = out / chapter.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(student, target)
        written.append(target)
        for path in paths:
            dest = out / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_IGNORED_PARTS))
            else:
                shutil.copy2(path, dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the student edition into")
    parser.add_argument("--toc", type=Path, default=ROOT / "_toc.yml", help="table of contents (default: the book's)")
    args = parser.parse_args(argv)
    try:
        written = write_student_edition(args.out, args.toc)
    except (ValueError, FileNotFoundError) as err:
        print(f"student_edition: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
