"""How long the book's main path takes to read, from its word counts.

    python scripts/reading_time.py           # a table: each page's measured time and the one it states
    python scripts/reading_time.py --check   # exit 1 if a stated time is off or the sum is over budget

The main path is the introduction and the numbered chapters of ``_toc.yml`` (the appendix is not
on it). A page's time is counted as a careful first reading with the code skimmed:

* prose at ``WORDS_PER_MINUTE`` words a minute: the Markdown a reader sees, and the text and
  tables the code prints (``text/markdown`` and stream outputs). Not counted: cells removed from
  the page (``remove-cell``), exercise solutions (``solution``) and anything folded into a
  dropdown (self-check answers, asides), since the main path does not open them;
* code at ``CODE_LINES_PER_MINUTE`` lines a minute, for cells whose input the page shows (not
  ``remove-cell``, ``remove-input``, ``hide-input``, ``hide-cell`` or ``solution``);
* ``SECONDS_PER_FIGURE`` seconds for each figure (an image output the page shows).

A chapter states its time in its first Markdown cell, under its title, as
``*Reading time: about N minutes.*``; ``--check`` (and ``tests/test_book_structure.py``) hold that
number within one minute of the count and the sum within ``BUDGET_MINUTES``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORDS_PER_MINUTE = 200
CODE_LINES_PER_MINUTE = 50
SECONDS_PER_FIGURE = 30
BUDGET_MINUTES = 180
STATED = re.compile(r"\*Reading time: about (\d+) minutes\.\*")

_HIDDEN_INPUT = {"remove-cell", "remove-input", "hide-input", "hide-cell", "solution"}
_HIDDEN_OUTPUT = {"remove-cell", "remove-output", "hide-output", "hide-cell", "solution"}
# A fenced MyST block (``` or ````) whose options fold it: {dropdown}, or :class: dropdown.
_FENCE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<kind>[^}]*)\}.*?^(?P=fence)\s*$", re.M | re.S)


@dataclass(frozen=True)
class ReadingTime:
    """What one page asks of its reader."""

    words: int
    code_lines: int
    figures: int

    @property
    def minutes(self) -> float:
        return (self.words / WORDS_PER_MINUTE + self.code_lines / CODE_LINES_PER_MINUTE
                + self.figures * SECONDS_PER_FIGURE / 60)


def visible_text(markdown: str) -> str:
    """Markdown without the blocks folded into a dropdown."""
    def keep(m):
        folded = m.group("kind") == "dropdown" or re.search(r"^:class:.*\bdropdown\b", m.group(0), re.M)
        return "" if folded else m.group(0)
    return _FENCE.sub(keep, markdown)


def _words(text: str) -> int:
    return len(text.split())


def count_notebook(path: Path) -> ReadingTime:
    nb = json.loads(path.read_text(encoding="utf-8"))
    words = code = figures = 0
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            if not tags & {"remove-cell", "solution"}:
                words += _words(visible_text(source))
            continue
        if cell["cell_type"] != "code":
            continue
        if not tags & _HIDDEN_INPUT:
            code += len([line for line in source.splitlines() if line.strip()])
        if tags & _HIDDEN_OUTPUT:
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data or "image/svg+xml" in data:
                figures += 1
            elif "text/markdown" in data:
                words += _words("".join(data["text/markdown"]))
            elif out.get("output_type") == "stream":
                words += _words("".join(out.get("text", "")))
    return ReadingTime(words, code, figures)


def count_markdown(path: Path) -> ReadingTime:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)          # front matter
    return ReadingTime(_words(visible_text(text)), 0, 0)


def main_path(toc: Path = ROOT / "_toc.yml") -> list[Path]:
    """The introduction and the pages of the toc's first part (the chapters), in order."""
    data = yaml.safe_load(toc.read_text(encoding="utf-8"))
    entries = [data["root"]] + [c["file"] for c in data["parts"][0]["chapters"]]
    pages = []
    for entry in entries:
        for suffix in (".ipynb", ".md"):
            if (toc.parent / (entry + suffix)).is_file():
                pages.append(toc.parent / (entry + suffix))
                break
        else:
            raise FileNotFoundError(f"{toc} lists {entry!r}, but neither .ipynb nor .md exists")
    return pages


def count(path: Path) -> ReadingTime:
    return count_notebook(path) if path.suffix == ".ipynb" else count_markdown(path)


def stated_minutes(path: Path) -> int | None:
    """The ``*Reading time: about N minutes.*`` a page states (first Markdown cell of a notebook)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = next(("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
                     and "remove-cell" not in c.get("metadata", {}).get("tags", [])), "")
    else:
        text = path.read_text(encoding="utf-8")
    m = STATED.search(text)
    return int(m.group(1)) if m else None


def problems(pages=None) -> list[str]:
    pages = main_path() if pages is None else pages
    found, total = [], 0.0
    for page in pages:
        t = count(page)
        total += t.minutes
        stated = stated_minutes(page)
        if stated is None:
            found.append(f"{page.name}: states no '*Reading time: about N minutes.*' under its title "
                         f"(measured {t.minutes:.1f})")
        elif abs(stated - t.minutes) > 1.0:
            found.append(f"{page.name}: states {stated} minutes, measured {t.minutes:.1f}")
    if total > BUDGET_MINUTES:
        found.append(f"the main path takes {total:.0f} minutes, over the budget of {BUDGET_MINUTES}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a wrong stated time or an over-budget sum")
    args = parser.parse_args(argv)
    total = 0.0
    print(f"{'page':42s} {'words':>6s} {'code':>5s} {'figs':>4s} {'min':>6s} {'stated':>6s}")
    for page in main_path():
        t = count(page)
        total += t.minutes
        print(f"{page.name:42s} {t.words:6d} {t.code_lines:5d} {t.figures:4d} {t.minutes:6.1f} "
              f"{stated_minutes(page) or '-':>6}")
    print(f"{'main path':42s} {'':6s} {'':5s} {'':4s} {total:6.1f}  (budget {BUDGET_MINUTES})")
    if args.check:
        found = problems()
        for p in found:
            print("FAIL:", p, file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
