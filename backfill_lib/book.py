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


#: The committed result files of each dataset, by kind (``results/README.md`` says which command
#: made each). Digits' tuning and sweep files keep their first names.
RESULT_FILES = {
    "digits": {"homogeneous": "digits_homogeneous", "heterogeneous": "digits_heterogeneous",
               "tuning": "tuning", "tuned": "digits_tuned", "tuned_uncertain_first": "digits_tuned_uncertain_first",
               "which_method_when": "which_method_when"},
    "fashion_mnist": {"homogeneous": "fashion_homogeneous", "heterogeneous": "fashion_heterogeneous",
                      "tuning": "fashion_tuning", "tuned": "fashion_tuned",
                      "tuned_uncertain_first": "fashion_tuned_uncertain_first",
                      "which_method_when": "fashion_which_method_when"},
}
_RESULT_KINDS = tuple(RESULT_FILES["digits"])


def result_name(dataset: str, kind: str, suffix: str = ".json") -> str | None:
    """The file name of one committed result of ``dataset``, or None when it has none.

    Parameters
    ----------
    dataset : str
        A chapter's ``DATASET`` ("fashion_mnist", "digits", "cifar100", ...).
    kind : {"homogeneous", "heterogeneous", "tuning", "tuned", "tuned_uncertain_first", "which_method_when"}
        Which result.
    suffix : {".json", ".md"}, default ".json"
        The JSON data or its Markdown table.

    Returns
    -------
    str or None
        E.g. ``"fashion_homogeneous.json"``; None for a dataset with no committed results (the
        paper-scale ``cifar100``: a chapter then shows its own run only).

    Raises
    ------
    ValueError
        If ``kind`` or ``suffix`` is not one of the values above.

    Examples
    --------
    >>> result_name("fashion_mnist", "tuned")
    'fashion_tuned.json'
    >>> result_name("digits", "tuning", ".md")
    'tuning.md'
    >>> result_name("cifar100", "homogeneous") is None
    True
    """
    if kind not in _RESULT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(_RESULT_KINDS)}, got {kind!r}")
    if suffix not in _RESULT_SUFFIXES:
        raise ValueError(f"suffix must be '.json' or '.md', got {suffix!r}")
    files = RESULT_FILES.get(dataset)
    return None if files is None else files[kind] + suffix


def dataset_result(dataset: str, kind: str, suffix: str = ".json"):
    """:func:`load_result` of :func:`result_name`: a committed result of ``dataset``, or None.

    Parameters
    ----------
    dataset, kind, suffix
        As in :func:`result_name`.

    Returns
    -------
    dict or str or None
        The parsed JSON (or Markdown text); None for a dataset with no committed results, so a
        chapter can write ``if committed is not None:`` around what only the committed runs show.

    Raises
    ------
    FileNotFoundError
        If the dataset has committed results but this file is missing (a broken checkout or wheel).

    Examples
    --------
    >>> dataset_result("digits", "homogeneous")["dataset"]
    'digits'
    >>> dataset_result("cifar100", "tuned") is None
    True
    """
    name = result_name(dataset, kind, suffix)
    return None if name is None else load_result(name)


# --- Tables, formatted numbers and source listings the chapters share ---------------------------

def _cell(value, floatfmt: str) -> str:
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "dtype").kind == "f"):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")  # a bar or newline would break the row


def markdown_table(rows, headers, floatfmt: str = ".3f", align=None, as_string: bool = False):
    """A Markdown table as cell output (the book has no pandas dependency).

    Parameters
    ----------
    rows : sequence of sequences
        One sequence of cells per row, each as long as ``headers``. Floats are formatted with
        ``floatfmt``; everything else with ``str`` (so pre-formatted strings such as
        ``"0.62 ± 0.01"`` pass unchanged). ``|`` inside a cell is escaped.
    headers : sequence of str
        The column titles.
    floatfmt : str, default ".3f"
        Format of float cells.
    align : sequence of {"left", "right", "center"}, optional
        Alignment per column; default Markdown's (left).
    as_string : bool, default False
        Return the Markdown text instead of an ``IPython.display.Markdown`` object.

    Returns
    -------
    IPython.display.Markdown or str
        By default an ``IPython.display.Markdown`` object, rendered as a table when it is a
        cell's last expression or passed to ``display``; the Markdown text if ``as_string``.

    Raises
    ------
    TypeError
        If a header is not a string (e.g. ``rows`` and ``headers`` were swapped).
    ValueError
        If ``headers`` is empty, a row has the wrong number of cells, or an alignment is unknown.

    Examples
    --------
    >>> print(markdown_table([["rank merge", 0.3644]], ["strategy", "relative gain"], as_string=True))
    | strategy | relative gain |
    | --- | --- |
    | rank merge | 0.364 |
    """
    headers = list(headers)
    if not headers:
        raise ValueError("headers is empty: give one title per column")
    if not all(isinstance(h, str) for h in headers):
        raise TypeError("headers must be strings (the column titles); the call is "
                        "markdown_table(rows, headers): were rows and headers swapped?")
    rows = [list(row) for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells but there are {len(headers)} headers")
    rules = {"left": "---", "right": "---:", "center": ":---:"}
    align = ["left"] * len(headers) if align is None else list(align)
    if len(align) != len(headers) or any(a not in rules for a in align):
        raise ValueError(f"align must give one of {', '.join(rules)} per column ({len(headers)} columns), "
                         f"got {align!r}")
    lines = ["| " + " | ".join(_cell(h, floatfmt) for h in headers) + " |",
             "| " + " | ".join(rules[a] for a in align) + " |"]
    lines += ["| " + " | ".join(_cell(c, floatfmt) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    if as_string:
        return text
    from IPython.display import Markdown

    return Markdown(text)


def mean_std(stat: dict, digits: int = 3) -> str:
    """Format a ``{"mean": m, "std": s}`` entry of the results JSON as ``"m ± s"``.

    Parameters
    ----------
    stat : dict
        A statistic over seeds from :func:`load_result`, e.g.
        ``result["strategies"]["mct"]["relative_gain"]``.
    digits : int, default 3
        Decimals of both numbers.

    Returns
    -------
    str
        E.g. ``"0.364 ± 0.011"``.

    Raises
    ------
    ValueError
        If ``stat`` has no ``"mean"`` and ``"std"`` (e.g. a whole strategy entry was passed).

    Examples
    --------
    >>> mean_std({"mean": 0.36444, "std": 0.01106})
    '0.364 ± 0.011'
    """
    if not isinstance(stat, dict) or "mean" not in stat or "std" not in stat:
        keys = sorted(stat) if isinstance(stat, dict) else type(stat).__name__
        raise ValueError(f"stat must be a {{'mean', 'std'}} entry of the results, got {keys}")
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def source_of(obj, docstring: bool = False, input_checks: bool = True) -> str:
    """The source of a function, method or class, optionally without docstrings and input checks.

    Docstrings are found with ``ast`` (every docstring of the object, nested ones included), so
    quotes inside the code are never mistaken for one. An input check is an ``if`` statement
    whose body only raises; each one left out is replaced by one comment line, so the listing
    never hides that checks exist.

    Parameters
    ----------
    obj : function, method or class
        Anything ``inspect.getsource`` accepts.
    docstring : bool, default False
        Keep the docstrings.
    input_checks : bool, default True
        Keep the ``if ...: raise ...`` input checks; False replaces each run of them by
        ``# (input checks left out)``.

    Returns
    -------
    str
        The source, dedented, without trailing blank lines.

    Raises
    ------
    TypeError
        If the source of ``obj`` cannot be found (a built-in, or an object defined in a notebook
        cell that was not saved).
    """
    import ast
    import inspect
    import textwrap

    try:
        src = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError) as err:
        raise TypeError(f"cannot find the source of {obj!r}: give a function, method or class defined in "
                        f"a file") from err
    lines = src.splitlines()
    drop: dict[int, str | None] = {}  # 0-based line -> replacement (None: delete)
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        if (not docstring and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            for i in range(body[0].lineno - 1, body[0].end_lineno):
                drop[i] = None
            if body[0].end_lineno < len(lines) and not lines[body[0].end_lineno].strip():
                drop[body[0].end_lineno] = None  # the blank line that followed the docstring
        if not input_checks:
            previous_was_check = False
            for stmt in body:
                is_check = (isinstance(stmt, ast.If) and not stmt.orelse
                            and all(isinstance(s, ast.Raise) for s in stmt.body))
                if is_check:
                    for i in range(stmt.lineno - 1, stmt.end_lineno):
                        drop[i] = None
                    if not previous_was_check:  # one comment per run of consecutive checks
                        drop[stmt.lineno - 1] = " " * stmt.col_offset + "# (input checks left out)"
                previous_was_check = is_check
    kept = [drop[i] if i in drop else line for i, line in enumerate(lines) if not (i in drop and drop[i] is None)]
    return "\n".join(kept).rstrip()


def show_source(obj, docstring: bool = False, input_checks: bool = True) -> None:
    """Print the source of a function, method or class, without its docstring by default.

    The chapters show the library's code this way, so the book and the library never diverge.

    Parameters
    ----------
    obj : function, method or class
        What to show, e.g. ``backfill_lib.losses.reverse_loss``.
    docstring : bool, default False
        Keep the docstrings.
    input_checks : bool, default True
        Keep the ``if ...: raise ...`` input checks (see :func:`source_of`).

    Raises
    ------
    TypeError
        If the source of ``obj`` cannot be found.
    """
    print(source_of(obj, docstring=docstring, input_checks=input_checks))
