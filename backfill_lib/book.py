"""Helpers shared by the chapters of the book (d2l's habit: the chapters import them, never
re-define them). Torch-free.

The committed results (``results/`` at the root of the repository: JSON and Markdown tables, our
measurements) are read with :func:`load_result`. A chapter opened in Colab has no checkout, so
the wheel ships a copy of ``results/`` as ``backfill_lib/_results/`` (see ``setup.py``); the
chapters find the results the same way in the repository, in an installed copy and in Colab.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

#: Environment variable naming a folder of results to read before the committed ones.
RESULTS_ENV = "BACKFILL_RESULTS"

_RESULT_SUFFIXES = (".json", ".md")


def _is_checkout(root: Path) -> bool:
    # The repository root: the library next to its results (a site-packages folder is not one).
    return (root / "pyproject.toml").is_file() and (root / "backfill_lib").is_dir() and (root / "results").is_dir()


def _result_places() -> list[tuple[str, Path]]:
    """The folders :func:`load_result` searches, in order, each with a description."""
    places: list[tuple[str, Path]] = []
    env = os.environ.get(RESULTS_ENV)
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir():
            raise ValueError(f"${RESULTS_ENV} is {env!r}, which is not a folder: point it at a folder "
                             f"of result files, or unset it to read the committed results")
        places.append((f"${RESULTS_ENV}", folder))
    package_root = Path(__file__).resolve().parent.parent
    roots = [package_root] + [d for d in (Path.cwd(), *Path.cwd().parents) if d != package_root]
    checkout = next((r for r in roots if _is_checkout(r)), None)
    if checkout is not None:
        places.append(("the repository", checkout / "results"))
    packaged = resources.files("backfill_lib") / "_results"
    if isinstance(packaged, Path):  # pip installs unpacked packages; a zipped import has no copy to read
        places.append(("the installed package", packaged))
    return places


def results_dir() -> Path:
    """The folder the committed results are read from.

    The first folder that exists of: ``$BACKFILL_RESULTS`` (if set), ``results/`` of the
    repository checkout (found from the location of ``backfill_lib``, else by walking up from the
    working directory), and the copy shipped inside the installed package
    (``backfill_lib/_results/``, what Colab has).

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    ValueError
        If ``$BACKFILL_RESULTS`` is set to something that is not a folder.
    FileNotFoundError
        If none of the places exists; the message lists them.

    Examples
    --------
    >>> from backfill_lib.book import results_dir
    >>> (results_dir() / "digits_homogeneous.json").is_file()
    True
    """
    places = _result_places()
    for _, folder in places:
        if folder.is_dir():
            return folder
    raise FileNotFoundError("no results folder found; searched: "
                            + "; ".join(f"{what} ({folder})" for what, folder in places))


def load_result(name: str) -> dict | list | str:
    """Read one committed result file by its file name.

    The file is looked up in each place of :func:`results_dir` in turn (``$BACKFILL_RESULTS``
    first, then the repository's ``results/``, then the packaged copy); the first place that has
    it wins, so ``$BACKFILL_RESULTS`` may hold only the files it overrides.

    Parameters
    ----------
    name : str
        File name in ``results/``, with its suffix, e.g. ``"digits_homogeneous.json"`` or
        ``"digits_homogeneous.md"``; no folders.

    Returns
    -------
    dict or list or str
        The parsed JSON for a ``.json`` file, the text of a ``.md`` file.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If ``name`` contains a folder or does not end in ``.json`` or ``.md``, or if
        ``$BACKFILL_RESULTS`` is set to something that is not a folder.
    FileNotFoundError
        If no place has the file; the message names the file and every place searched.

    Examples
    --------
    >>> from backfill_lib.book import load_result
    >>> load_result("digits_homogeneous.json")["dataset"]
    'digits'
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a file name (str) such as 'digits_homogeneous.json', "
                        f"got {type(name).__name__}")
    if Path(name).name != name or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"name must be a bare file name in results/, such as "
                         f"'digits_homogeneous.json', got {name!r}")
    if not name.endswith(_RESULT_SUFFIXES):
        raise ValueError(f"name must end in .json or .md (the result files), got {name!r}: "
                         f"add the suffix, e.g. {name.rsplit('.', 1)[0] + '.json'!r}")
    places = _result_places()
    for _, folder in places:
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text) if name.endswith(".json") else text
    raise FileNotFoundError(f"result file {name!r} not found; searched: "
                            + "; ".join(f"{what} ({folder})" for what, folder in places))
