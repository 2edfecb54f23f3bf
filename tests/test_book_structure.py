"""The main path's shape (issue 18), checked on the committed chapters: each states its reading
time (held by ``scripts/reading_time.py``'s count) and the sum fits three hours; each opens with a
bottom line of at most three sentences and ends with a self-check whose answers are folded;
solutions show their text before any output and hide their checks; no chapter uses a method or
concept before the chapter that introduces it; no reader-facing test markers."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("reading_time", ROOT / "scripts" / "reading_time.py")
reading_time = importlib.util.module_from_spec(_spec)
sys.modules["reading_time"] = reading_time
_spec.loader.exec_module(reading_time)

MAIN_PATH = reading_time.main_path()
CHAPTERS = [p for p in MAIN_PATH if p.suffix == ".ipynb"]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _tags(cell) -> set:
    return set(cell.get("metadata", {}).get("tags", []))


def _src(cell) -> str:
    return "".join(cell["source"])


def _shown_markdown(path: Path) -> list[str]:
    return [_src(c) for c in _cells(path) if c["cell_type"] == "markdown" and "remove-cell" not in _tags(c)]


# --- reading time ---------------------------------------------------------------------------------

def test_the_main_path_is_the_intro_and_eight_chapters():
    assert [p.name for p in MAIN_PATH][0] == "intro.md" and len(CHAPTERS) == 8


@pytest.mark.parametrize("page", MAIN_PATH, ids=[p.stem for p in MAIN_PATH])
def test_each_page_states_its_measured_reading_time(page):
    stated, measured = reading_time.stated_minutes(page), reading_time.count(page).minutes
    assert stated is not None, f"{page.name} states no '*Reading time: about N minutes.*' under its title"
    assert abs(stated - measured) <= 1.0, f"{page.name} states {stated} min, counted {measured:.1f}"


def test_the_main_path_fits_three_hours():
    total = sum(reading_time.count(p).minutes for p in MAIN_PATH)
    assert total <= reading_time.BUDGET_MINUTES, f"the main path takes {total:.0f} minutes"


def test_the_intro_states_the_main_paths_total():
    m = re.search(r"\*\*about (\d+) minutes\*\*", (ROOT / "book" / "intro.md").read_text(encoding="utf-8"))
    assert m, "the introduction states no '**about N minutes**' for the main path"
    total = sum(reading_time.count(p).minutes for p in MAIN_PATH)
    assert abs(int(m.group(1)) - total) <= 10, f"the intro says {m.group(1)} minutes, the count is {total:.0f}"


def test_the_count_leaves_out_folded_text_and_hidden_code(tmp_path):
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# T\n\n*Reading time: about 1 minutes.*\n\none two three"},
        {"cell_type": "markdown", "metadata": {}, "source": "```{admonition} Answer\n:class: dropdown\n\nfolded words here\n```\nfour"},
        {"cell_type": "markdown", "metadata": {"tags": ["solution"]}, "source": "solution words"},
        {"cell_type": "code", "metadata": {}, "source": "a = 1\n\nb = 2", "outputs": [
            {"output_type": "stream", "name": "stdout", "text": "five six"},
            {"output_type": "display_data", "data": {"image/png": "x"}, "metadata": {}}]},
        {"cell_type": "code", "metadata": {"tags": ["hide-input"]}, "source": "c = 3", "outputs": []},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "page.ipynb"
    path.write_text(json.dumps(nb))
    t = reading_time.count(path)
    # "#", "T", "*Reading", "time:", "about", "1", "minutes.*", "one", "two", "three", "four", "five", "six"
    assert (t.words, t.code_lines, t.figures) == (13, 2, 1)
    assert reading_time.stated_minutes(path) == 1


# --- bottom line and self-check ---------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!vs)(?<!\d)[.!?](?=\s|$)")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_opens_with_a_short_bottom_line(chapter):
    first = _shown_markdown(chapter)[0]
    m = re.search(r"\*\*Bottom line\.\*\*(.*?)(?:\n\s*\n|\Z)", first, re.S)
    assert m, f"{chapter.name}: the title cell has no '**Bottom line.**' paragraph"
    sentences = len(_SENTENCE_END.findall(m.group(1).strip()))
    assert 1 <= sentences <= 3, f"{chapter.name}: the bottom line has {sentences} sentences (at most 3)"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_ends_with_a_self_check_with_folded_answers(chapter):
    shown = _shown_markdown(chapter)
    start = next((i for i, s in enumerate(shown) if re.match(r"\s*## Self-check", s)), None)
    assert start is not None, f"{chapter.name} has no '## Self-check' section"
    section = [shown[start]]
    for s in shown[start + 1:]:
        if re.match(r"\s*## ", s):
            break
        section.append(s)
    text = "\n".join(section)
    questions = re.findall(r"^\*\*\d+\.\*\*", text, re.M)
    answers = re.findall(r"\{admonition\} Answer\s*\n:class: dropdown", text)
    assert len(questions) >= 4, f"{chapter.name}: {len(questions)} self-check questions (about five)"
    assert len(answers) == len(questions), f"{chapter.name}: {len(questions)} questions, {len(answers)} folded answers"


# --- exercises --------------------------------------------------------------------------------------

@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_solutions_show_text_first_and_no_checks(chapter):
    cells = _cells(chapter)
    for i, c in enumerate(cells):
        tags = _tags(c)
        if "solution" not in tags or "remove-cell" in tags:
            continue                       # a removed check of a solution is not on the page
        if c["cell_type"] == "code":
            assert not re.search(r"^\s*assert\b", _src(c), re.M), \
                f"{chapter.name} cell {i}: a solution shows an assert (move it to a remove-cell claim-check)"
            assert "hide-cell" in tags, f"{chapter.name} cell {i}: solution code must be folded with its output (hide-cell)"
            first = i
            while first > 0 and "solution" in _tags(cells[first - 1]):
                first -= 1                 # the start of this run of solution cells
            assert cells[first]["cell_type"] == "markdown", \
                f"{chapter.name} cell {i}: the solution's code comes before its text"


def test_no_reader_facing_test_markers():
    for page in CHAPTERS:
        for c in _cells(page):
            assert "NBVAL" not in _src(c), f"{page.name}: a '# NBVAL...' marker is visible to readers (use cell tags)"


# --- no forward references --------------------------------------------------------------------------

#: What each chapter introduces, and how a later one names it in prose or code.
INTRODUCED = {
    "02_rank_merge": [r"rank[ _]merge(?!_calibrated)"],
    "03_backward_compatible_training": [r"\bBCT\b", r"\bbct\b", r"RA-BCT", r"Hot-Refresh", r"\bra_bct\b"],
    "04_reverse_transformation": [r"reverse[ _]transform", r"\bψ\b", r"\\psi", r"forward[ _]transform", r"forward map"],
    "05_metric_compatible_training": [r"metric-compatible", r"\bmct\b", r"L_\{?mc", r"\bρ\b", r"\\rho\b"],
    "06_which_method_when": [r"open-class", r"bct_pseudo", r"calibrated rank merge", r"rank_merge_calibrated"],
    "07_backfill_order": [r"uncertain(?:ty)?[-_ ]first"],
    "08_live_index": [r"OnlineBackfillIndex", r"QdrantBackfillIndex", r"BackfillJob"],
}


def _uses(text: str, patterns) -> list[str]:
    return sorted({m.group(0) for p in patterns for m in re.finditer(p, text)})


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_no_chapter_uses_what_a_later_one_introduces(chapter):
    order = [p.stem for p in CHAPTERS]
    later = order[order.index(chapter.stem) + 1:]
    found = {}
    for c in _cells(chapter):
        if "remove-cell" in _tags(c):
            continue
        text = _src(c)
        if c["cell_type"] == "markdown" and re.match(r"\s*## References", text):
            continue                       # the references may point ahead
        # a sentence that only points ahead with a {doc} link is a pointer, not a use
        text = "\n".join(line for line in text.splitlines() if "{doc}" not in line)
        for stem in later:
            hits = _uses(text, INTRODUCED.get(stem, []))
            if hits:
                found.setdefault(stem, set()).update(hits)
    assert not found, f"{chapter.name} uses what later chapters introduce: " + \
        "; ".join(f"{k}: {sorted(v)}" for k, v in found.items())


def test_the_intro_quotes_the_committed_tuned_numbers():
    """The introduction's bottom line quotes one version of each gain: the committed 3-seed tuned
    random-order results on Fashion-MNIST."""
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    res = json.loads((ROOT / "results" / "fashion_tuned.json").read_text(encoding="utf-8"))
    assert res["order"] == "random" and len(res["seeds"]) == 3
    gain = {n: f"{s['relative_gain']['mean']:.2f}" for n, s in res["strategies"].items() if "relative_gain" in s}
    bottom = intro.split("## The bottom line", 1)[1].split("**What remains", 1)[0]
    quoted = {
        "mct": r"metric-compatible\s+training recovers (\d\.\d\d)",
        "forward_transform": r"forward map that\s+rewrites the stored old vectors once recovers (\d\.\d\d)",
        "rank_merge": r"rank merge \((\d\.\d\d)\)",
        "bct": r"BCT \((\d\.\d\d)\)",
        "reverse_transform": r"reverse map trained alone \((\d\.\d\d)\)",
    }
    for name, pattern in quoted.items():
        m = re.search(pattern, bottom)
        assert m, f"the intro's bottom line no longer quotes {name}"
        assert m.group(1) == gain[name], f"intro: {name} {m.group(1)}, committed {gain[name]}"
