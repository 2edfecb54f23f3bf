"""The glossary and the notation say what the book and the library say.

* every ``{term}`` a page uses has an entry in ``book/glossary.md`` (its MyST ``glossary`` block);
* every backticked code name in ``glossary.md`` and ``notation.md`` that looks like a library name
  (an identifier, a dotted path, optionally a call) exists in ``backfill_lib``, and the
  parameters a call names are parameters of that function;
* every symbol row of ``notation.md`` names an introducing chapter that exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import backfill_lib

BOOK = Path(__file__).resolve().parent.parent / "book"
GLOSSARY = BOOK / "glossary.md"
NOTATION = BOOK / "notation.md"

# Code words in the glossary and notation that are not backfill_lib names, each with its reason.
NOT_LIBRARY = {
    "IndexFlatIP": "faiss's exact inner-product index, named where the notation explains why ranking by score is exact",
}

TERM_ROLE = re.compile(r"\{term\}`([^`]*)`")
DOC_ROLE = re.compile(r"\{doc\}`([^`<]*?)(?:\s*<([^>]*)>)?`")
ROLE = re.compile(r"\{[\w:-]+\}`[^`]*`")   # a MyST role and its argument: {term}`...`, {cite:t}`...`
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LIBRARY_NAME = re.compile(r"^(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\((?P<args>[^()]*)\))?$")
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


# --- Parsing ------------------------------------------------------------------------------------

def glossary_terms(text: str) -> set[str]:
    """The terms of the MyST ``glossary`` block: unindented lines (a term and its aliases)."""
    m = re.search(r"^(`{3,})\{glossary\}[^\n]*\n(?P<body>.*?)^\1\s*$", text, re.M | re.S)
    assert m, "glossary.md has no ```{glossary} block"
    terms = set()
    for line in m.group("body").splitlines():
        if line.strip() and not line[0].isspace() and not line.startswith(":"):
            terms.add(line.strip())
    return terms


def term_target(role_text: str) -> str:
    """The glossary entry a ``{term}`` role points to: ``text <Term>`` or the text itself."""
    text = " ".join(role_text.split())
    m = re.match(r"^(.*?)\s*<([^>]+)>$", text)
    return m.group(2).strip() if m else text


def page_texts():
    """(page name, text) of every Markdown page and every notebook cell's source under book/."""
    for path in sorted(BOOK.glob("*.md")):
        yield path.name, path.read_text(encoding="utf-8")
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            yield path.name, "".join(cell["source"])


def term_uses() -> list[tuple[str, str]]:
    return [(page, term_target(m.group(1))) for page, text in page_texts() for m in TERM_ROLE.finditer(text)]


def code_spans(text: str) -> list[str]:
    text = re.sub(r"^\s*(`{3,}|:{3,}).*$", "", text, flags=re.M)  # fence lines (```{glossary}), not spans
    text = re.sub(r"``[^\n]*?``", "", text)                         # double-backtick spans quote MyST syntax
    text = ROLE.sub("", text)
    return [m.group(1).strip() for m in CODE_SPAN.finditer(text)]


def library_modules() -> list:
    modules = [backfill_lib]
    for info in pkgutil.walk_packages(backfill_lib.__path__, prefix="backfill_lib."):
        modules.append(importlib.import_module(info.name))
    return modules


def resolve(path: str, modules) -> object | None:
    """The object a dotted name names in backfill_lib (the package, or any of its modules)."""
    first, *rest = path.split(".")
    for module in modules:
        if first in getattr(module, "__all__", ()) or hasattr(module, first):
            obj = getattr(module, first)
            break
        if module.__name__.rsplit(".", 1)[-1] == first:
            obj = module
            break
    else:
        return None
    for name in rest:
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            # A dataclass field without a default is not a class attribute.
            obj = next(f for f in dataclasses.fields(obj) if f.name == name)
        else:
            return None
    return obj


def strategy_names() -> set[str]:
    from backfill_lib.strategies import STRATEGY_REGISTRY
    return set(STRATEGY_REGISTRY)


def code_name_problems(text: str, modules, strategies) -> list[str]:
    """What is wrong with the library names of one page's code spans."""
    problems = []
    for span in code_spans(text):
        m = LIBRARY_NAME.match(span)
        if not m or span in NOT_LIBRARY:
            continue                                               # an expression, a string, a faiss word
        path, args = m.group("path"), m.group("args")
        if args is None and path in strategies:
            continue                                               # a strategy of the registry, e.g. mct
        obj = resolve(path, modules)
        if obj is None:
            problems.append(f"`{span}`: {path} is not a name in backfill_lib")
            continue
        if not args:
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            problems.append(f"`{span}`: {path} cannot be called")
            continue
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for arg in (a.strip() for a in args.split(",")):
            name = arg.split("=", 1)[0].strip() if "=" in arg else arg
            if IDENTIFIER.match(name) and name not in params and not takes_kwargs:
                problems.append(f"`{span}`: {path} has no parameter {name!r}")
    return problems


# --- Tests --------------------------------------------------------------------------------------

def test_every_term_has_a_glossary_entry():
    terms = {t.lower() for t in glossary_terms(GLOSSARY.read_text(encoding="utf-8"))}
    missing = sorted({f"{page}: {{term}}`{term}`" for page, term in term_uses() if term.lower() not in terms})
    assert not missing, "terms without a glossary entry:\n" + "\n".join(missing)


def test_glossary_parser_sees_the_entries():
    terms = glossary_terms(GLOSSARY.read_text(encoding="utf-8"))
    assert {"rank merge", "distance rank merge", "BCT", "negative flip", "Platt scaling"} <= terms
    assert term_target("negative flips <negative flip>") == "negative flip"
    assert term_target("negative\n  flips <negative flip>") == "negative flip"
    assert term_target("rank merge") == "rank merge"


@pytest.mark.parametrize("page", [GLOSSARY, NOTATION], ids=lambda p: p.name)
def test_code_names_exist_in_the_library(page):
    problems = code_name_problems(page.read_text(encoding="utf-8"), library_modules(), strategy_names())
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_code_name_check_catches_bad_names():
    modules, strategies = library_modules(), strategy_names()
    bad = ("`negative_flip_rates`, `BackfillCurve.auc`, `ReverseTransform(learn_psi=True)`, "
           "`fit_reverse_transformation`, {cite:t}`shen2020bct` and `backfill_lib.nowhere`")
    assert len(code_name_problems(bad, modules, strategies)) == 5
    assert code_spans("{term}`AP` and `auc_map`, {doc}`x <y>` `b`") == ["auc_map", "b"]
    assert code_spans("```{glossary}\nAP\n  `a` and ``{term}`c` ``\n```\n") == ["a"]
    good = ("`BackfillCurve.negative_flips`, `BackfillCurve.auc_map`, `ReverseTransform(learn_rho=True)`, "
            "`backfill_order(n, policy=\"uncertain_first\")`, `mct`, {term}`rank merge`, `IndexFlatIP`, "
            "`search(queries, k) → (scores, ids)`")
    assert code_name_problems(good, modules, strategies) == []


def notation_rows(text: str) -> list[list[str]]:
    """The body rows of notation.md's symbol tables (symbol, meaning, in code, introduced in)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.match(r"^\|[-| ]+\|$", line) or line.startswith("| symbol"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append(cells)
    return rows


def test_every_symbol_names_an_existing_introducing_chapter():
    rows = notation_rows(NOTATION.read_text(encoding="utf-8"))
    assert len(rows) > 30
    problems = []
    for cells in rows:
        assert len(cells) == 4, f"a notation row without four columns: {cells}"
        docs = DOC_ROLE.findall(cells[3])
        if not docs:
            problems.append(f"{cells[0]}: names no introducing chapter")
        for name, target in docs:
            doc = (target or name).strip()
            if not (BOOK / f"{doc}.ipynb").is_file() and not (BOOK / f"{doc}.md").is_file():
                problems.append(f"{cells[0]}: introduced in {doc}, which does not exist")
    assert not problems, "\n".join(problems)


def test_notation_italics_are_glossary_terms():
    # The notation says: "Words in *italics* have an entry in the glossary".
    terms = {t.lower() for t in glossary_terms(GLOSSARY.read_text(encoding="utf-8"))}
    text = re.sub(r"\$[^$]*\$", "", NOTATION.read_text(encoding="utf-8"))     # math: * is not emphasis
    italic = set(re.findall(r"(?<![*\w])\*([^*\n]+)\*(?!\*)", text)) - {"italics"}
    missing = sorted(w for w in italic if w.lower() not in terms)
    assert not missing, f"italic words in notation.md without a glossary entry: {missing}"


def test_glossary_chapter_links_exist():
    for page in (GLOSSARY, NOTATION):
        for name, target in DOC_ROLE.findall(page.read_text(encoding="utf-8")):
            doc = (target or name).strip()
            assert (BOOK / f"{doc}.ipynb").is_file() or (BOOK / f"{doc}.md").is_file(), f"{page.name}: {doc}"
