"""scripts/student_edition.py: solutions and outputs removed, everything else kept and runnable.

On a small synthetic book (a fixture with solution cells, an image, a data file and files no
notebook needs) the student notebook is executed top to bottom with nbclient. On the real book
every chapter of _toc.yml is converted and checked, without executing it (nbval and the book
build run the chapters).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("student_edition", ROOT / "scripts" / "student_edition.py")
se = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(se)

# Turn on (True) once every chapter has been converted to the exercise/solution cell tags of
# /work/notes/BOOK_CONVENTIONS.md; until then the check below is reported as xfail, not as a failure.
CHAPTERS_CONVERTED = True

SECRET_PROSE = "SECRET_ANSWER_42"
SECRET_CODE = "SOLUTION_CODE_MARKER"
SOLUTION_ADMONITION = re.compile(r"\{admonition\}\s*Solution", re.IGNORECASE)


def _cell(kind, source, tags=(), cell_id=None, outputs=None):
    cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    if cell_id:
        cell.id = cell_id
    if kind == "code" and outputs is not None:
        cell.outputs = outputs
        cell.execution_count = 7
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    return cell


def _stream(text):
    return [new_output("stream", name="stdout", text=text)]


def _lesson():
    cells = [
        _cell("markdown", "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](x)",
              tags=["remove-cell"], cell_id="colab-badge"),
        _cell("code", 'import csv\nwith open("data/table.csv") as f:\n    rows = list(csv.reader(f))\nrows',
              outputs=[new_output("execute_result", data={"text/plain": "[['1'], ['2'], ['3']]"}, execution_count=7)]),
        _cell("markdown", "# A lesson\n\n![a picture](assets/pic.png)\n\nSee [the glossary](glossary.md)."),
        _cell("markdown", "**1.** What is the sum of the first column?", tags=["exercise"]),
        _cell("markdown", f"````{{admonition}} Solution\n:class: dropdown\n\nThe sum is {SECRET_PROSE}.\n````",
              tags=["solution"]),
        _cell("code", f"secret_total = sum(int(r[0]) for r in rows)  # {SECRET_CODE}\nprint(secret_total)",
              tags=["solution", "hide-input"], outputs=_stream("6\n")),
        _cell("code", "%matplotlib inline\ntotal_rows = len(rows)\nassert total_rows == 3\nprint('kept', total_rows)",
              outputs=_stream("kept 3\n")),
        _cell("markdown", "## Key takeaways\n\nRows are rows."),
    ]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"},
                                             "widgets": {"application/vnd.jupyter.widget-state+json": {}}})
    return nb


@pytest.fixture
def synthetic_book(tmp_path):
    """A repository with a toc, two Markdown pages, one chapter and files only some of which it needs."""
    root = tmp_path / "repo"
    book = root / "book"
    (book / "assets").mkdir(parents=True)
    (book / "data").mkdir()
    (root / "results").mkdir()
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nparts:\n  - caption: Chapters\n"
                                   "    chapters:\n      - file: book/lesson\n      - file: book/glossary\n")
    (book / "intro.md").write_text("# Intro\n")
    (book / "glossary.md").write_text("# Glossary\n")
    (book / "assets" / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (book / "assets" / "unused.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (book / "data" / "table.csv").write_text("1\n2\n3\n")
    (book / "unused.txt").write_text("not needed\n")
    (root / "results" / "unused.json").write_text("{}\n")
    nbformat.write(_lesson(), book / "lesson.ipynb")
    return root


def _kept(nb):
    return [c for c in nb.cells if not se.is_solution(c) and c.get("id") != se.BADGE_ID]


def _assert_student_version(original, student):
    """No solution left, no output left, every other cell kept in order."""
    assert [(c.cell_type, c.source) for c in student.cells] == [(c.cell_type, c.source) for c in _kept(original)]
    solutions = {c.source.strip() for c in original.cells if se.is_solution(c)}
    assert not solutions & {c.source.strip() for c in student.cells}
    assert not any(SOLUTION_ADMONITION.search(c.source) for c in student.cells)
    for cell in student.cells:
        assert "execution" not in cell.metadata
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert "widgets" not in student.metadata


def test_synthetic_book(synthetic_book, tmp_path):
    out = tmp_path / "student"
    written = se.write_student_edition(out, synthetic_book / "_toc.yml")
    assert written == [out / "book" / "lesson.ipynb"]  # the Markdown pages are not chapters

    text = written[0].read_text()
    for secret in (SECRET_PROSE, SECRET_CODE, "secret_total"):
        assert secret not in text
    original = nbformat.read(synthetic_book / "book" / "lesson.ipynb", as_version=4)
    student = nbformat.read(written[0], as_version=4)
    _assert_student_version(original, student)
    assert len(student.cells) == len(original.cells) - 3  # two solution cells and the badge
    assert any("exercise" in c.metadata.get("tags", []) for c in student.cells)

    # The image shown and the data file read are copied; nothing else is.
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"book/lesson.ipynb", "book/assets/pic.png", "book/data/table.csv"}

    # The student notebook runs top to bottom where it was written.
    NotebookClient(student, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(out / "book")}}).execute()
    last = student.cells[-2]
    assert last.cell_type == "code" and "kept 3" in "".join(o.get("text", "") for o in last.outputs)


def test_original_is_not_modified(synthetic_book, tmp_path):
    path = synthetic_book / "book" / "lesson.ipynb"
    before = path.read_bytes()
    se.write_student_edition(tmp_path / "student", synthetic_book / "_toc.yml")
    assert path.read_bytes() == before


@pytest.mark.parametrize("where", ["book", "book/sub", "."])
def test_refuses_the_book_folder_and_the_root(synthetic_book, where):
    before = sorted(p.relative_to(synthetic_book) for p in synthetic_book.rglob("*"))
    with pytest.raises(ValueError, match="--out"):
        se.write_student_edition(synthetic_book / where, synthetic_book / "_toc.yml")
    assert sorted(p.relative_to(synthetic_book) for p in synthetic_book.rglob("*")) == before


def test_cli_refuses_the_repository_book_folder(capsys):
    assert se.main(["--out", str(ROOT / "book")]) == 2
    assert "book's own folder" in capsys.readouterr().err
    assert not (ROOT / "book" / "book").exists()


def test_untagged_solution_is_refused():
    nb = new_notebook(cells=[_cell("markdown", "**1.** Why?", tags=["exercise"]),
                             _cell("markdown", "```{admonition} Solution\n:class: dropdown\nBecause.\n```")])
    with pytest.raises(ValueError, match="not tagged 'solution'"):
        se.student_notebook(nb, "lesson")


def test_solution_must_not_define_what_a_later_cell_uses():
    nb = new_notebook(cells=[_cell("code", "x = 1"),
                             _cell("code", "answer = x + 1", tags=["solution"]),
                             _cell("code", "print(answer)")])
    with pytest.raises(ValueError, match="answer"):
        se.student_notebook(nb, "lesson")
    # Re-assigning a name the student cells defined changes what the later cell sees: refused too.
    nb.cells[0].source = "x = 1\nanswer = 0"
    with pytest.raises(ValueError, match="answer"):
        se.student_notebook(nb, "lesson")
    # A later cell that assigns the name itself does not depend on the solution.
    nb.cells[2].source = "answer = 5\nprint(answer)"
    assert len(se.student_notebook(nb, "lesson").cells) == 2


REAL_CHAPTERS = se.toc_chapters(ROOT / "_toc.yml")


@pytest.mark.parametrize("chapter", REAL_CHAPTERS, ids=[c.stem for c in REAL_CHAPTERS])
def test_real_chapter(chapter):
    original = nbformat.read(chapter, as_version=4)
    _assert_student_version(original, se.student_notebook(original, chapter.name))


def test_real_edition(tmp_path):
    out = tmp_path / "student"
    assert se.main(["--out", str(out)]) == 0
    assert [p.relative_to(out) for p in sorted((out / "book").glob("*.ipynb"))] == \
           sorted(c.relative_to(ROOT) for c in REAL_CHAPTERS)


MAIN_CHAPTERS = [c for c in REAL_CHAPTERS if c.stem[:1].isdigit()]   # the appendix has no exercises


@pytest.mark.xfail(not CHAPTERS_CONVERTED, strict=False,
                   reason="chapters not yet converted to the 'exercise'/'solution' cell tags (issue 8); "
                          "set CHAPTERS_CONVERTED = True when they are")
@pytest.mark.parametrize("chapter", MAIN_CHAPTERS, ids=[c.stem for c in MAIN_CHAPTERS])
def test_real_chapter_has_exercises_and_solutions(chapter):
    tags = [set(c.metadata.get("tags", [])) for c in nbformat.read(chapter, as_version=4).cells]
    assert any(se.EXERCISE_TAG in t for t in tags), f"{chapter.name} has no cell tagged 'exercise'"
    assert any(se.SOLUTION_TAG in t for t in tags), f"{chapter.name} has no cell tagged 'solution'"


# --- Symbolic links: never write through one into the book (issue 16) ---------------------------

def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_refuses_an_output_folder_that_is_a_link_to_the_book(synthetic_book, tmp_path):
    link = tmp_path / "student"
    link.symlink_to(synthetic_book / "book", target_is_directory=True)
    before = _tree(synthetic_book)
    with pytest.raises(ValueError, match="--out .*book's own folder"):
        se.write_student_edition(link, synthetic_book / "_toc.yml")
    assert _tree(synthetic_book) == before


def test_refuses_an_output_path_through_a_linked_folder(synthetic_book, tmp_path):
    (tmp_path / "via").symlink_to(synthetic_book, target_is_directory=True)
    before = _tree(synthetic_book)
    with pytest.raises(ValueError, match="--out"):
        se.write_student_edition(tmp_path / "via" / "book" / "student", synthetic_book / "_toc.yml")
    assert _tree(synthetic_book) == before


def test_refuses_a_link_inside_the_output_folder_back_to_the_book(synthetic_book, tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "book").symlink_to(synthetic_book / "book", target_is_directory=True)  # out/book/lesson.ipynb = the chapter
    before = _tree(synthetic_book)
    assert se.main(["--out", str(out), "--toc", str(synthetic_book / "_toc.yml")]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "book's own folder" in err
    assert _tree(synthetic_book) == before
    assert SECRET_PROSE in (synthetic_book / "book" / "lesson.ipynb").read_text()  # the solutions are still there


def test_refuses_a_deeper_link_inside_the_output_folder(synthetic_book, tmp_path):
    out = tmp_path / "student"
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "back").symlink_to(synthetic_book / "book" / "assets", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        se.write_student_edition(out, synthetic_book / "_toc.yml")


def test_refuses_to_copy_a_file_onto_itself_through_a_link(synthetic_book, tmp_path):
    # out/results -> the repository's results/: the copy of a needed result would overwrite its source.
    (synthetic_book / "results" / "numbers.json").write_text("[1, 2]\n")
    lesson = nbformat.read(synthetic_book / "book" / "lesson.ipynb", as_version=4)
    lesson.cells.append(_cell("code", 'import json\njson.load(open("../results/numbers.json"))'))
    nbformat.write(lesson, synthetic_book / "book" / "lesson.ipynb")
    out = tmp_path / "student"
    out.mkdir()
    (out / "results").symlink_to(synthetic_book / "results", target_is_directory=True)
    with pytest.raises(ValueError, match="own source"):
        se.write_student_edition(out, synthetic_book / "_toc.yml")
    assert not (out / "book").exists()  # nothing written before the refusal
    assert (synthetic_book / "results" / "numbers.json").read_text() == "[1, 2]\n"


def test_a_harmless_link_inside_the_output_folder_is_kept(synthetic_book, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes").symlink_to(elsewhere, target_is_directory=True)
    assert se.write_student_edition(out, synthetic_book / "_toc.yml") == [out / "book" / "lesson.ipynb"]
