"""backfill_lib.book: where the chapters read the committed results from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backfill_lib import book
from backfill_lib.book import RESULTS_ENV, load_result, results_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(RESULTS_ENV, raising=False)


def test_reads_the_committed_results_of_the_checkout(no_env):
    assert results_dir() == ROOT / "results"
    want = json.loads((ROOT / "results" / "digits_homogeneous.json").read_text())
    assert load_result("digits_homogeneous.json") == want


def test_markdown_is_returned_as_text(no_env):
    text = load_result("digits_homogeneous.md")
    assert isinstance(text, str)
    assert text == (ROOT / "results" / "digits_homogeneous.md").read_text()


def test_checkout_found_by_walking_up_from_cwd(no_env, monkeypatch, tmp_path):
    # A checkout elsewhere, found from the working directory when the package is not in one.
    (tmp_path / "backfill_lib").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "only_here.json").write_text('{"where": "cwd checkout"}')
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    monkeypatch.setattr(book, "__file__", str(tmp_path / "site-packages" / "backfill_lib" / "book.py"))
    assert results_dir() == tmp_path / "results"
    assert load_result("only_here.json") == {"where": "cwd checkout"}


def test_env_folder_comes_first_and_may_hold_only_some_files(monkeypatch, tmp_path):
    (tmp_path / "digits_homogeneous.json").write_text('{"mine": [1, 2]}')
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    assert results_dir() == tmp_path
    assert load_result("digits_homogeneous.json") == {"mine": [1, 2]}
    # a file the folder does not override comes from the committed results
    assert load_result("query_cost.json") == json.loads((ROOT / "results" / "query_cost.json").read_text())


def test_env_not_a_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=RESULTS_ENV):
        load_result("digits_homogeneous.json")
    with pytest.raises(ValueError, match=RESULTS_ENV):
        results_dir()


def test_packaged_copy_is_the_last_place(no_env, monkeypatch, tmp_path):
    # Outside any checkout (Colab): the copy inside the installed package is read.
    site = tmp_path / "site-packages"
    (site / "backfill_lib" / "_results").mkdir(parents=True)
    (site / "backfill_lib" / "_results" / "r.json").write_text("[3]")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    monkeypatch.setattr(book, "__file__", str(site / "backfill_lib" / "book.py"))
    monkeypatch.setattr(book.resources, "files", lambda pkg: site / pkg)
    assert results_dir() == site / "backfill_lib" / "_results"
    assert load_result("r.json") == [3]


def test_missing_file_names_the_file_and_every_place(monkeypatch, tmp_path):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_result("no_such_result.json")
    msg = str(err.value)
    assert "no_such_result.json" in msg
    assert str(tmp_path) in msg and str(ROOT / "results") in msg and "_results" in msg


def test_no_results_folder_at_all(no_env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(book, "__file__", str(tmp_path / "sp" / "backfill_lib" / "book.py"))
    monkeypatch.setattr(book.resources, "files", lambda pkg: tmp_path / "sp" / pkg)
    with pytest.raises(FileNotFoundError, match="no results folder"):
        results_dir()
    with pytest.raises(FileNotFoundError, match="digits_homogeneous.json"):
        load_result("digits_homogeneous.json")


@pytest.mark.parametrize("name", ["../results/digits_homogeneous.json", "results/query_cost.json",
                                  "sub\\x.json", "", "digits_homogeneous", "digits_homogeneous.txt"])
def test_bad_names_are_refused(no_env, name):
    with pytest.raises(ValueError, match="name"):
        load_result(name)


@pytest.mark.parametrize("name", [None, 3, Path("digits_homogeneous.json")])
def test_name_must_be_a_string(no_env, name):
    with pytest.raises(TypeError, match="name"):
        load_result(name)


def test_every_committed_result_name_exists_and_matches_its_dataset():
    from backfill_lib.book import RESULT_FILES, dataset_result, result_name

    for dataset, kinds in RESULT_FILES.items():
        for kind in kinds:
            name = result_name(dataset, kind)
            assert (ROOT / "results" / name).is_file(), name
            content = dataset_result(dataset, kind)
            if kind != "tuning" or dataset != "digits":  # digits' first tuning file predates the field
                assert content.get("dataset", "digits") == dataset, name
            assert isinstance(dataset_result(dataset, kind, ".md"), str)


@pytest.mark.parametrize("kind, suffix", [("homogenous", ".json"), ("tuned", "json"), ("tuned", ".csv")])
def test_result_name_refuses_an_unknown_kind_or_suffix(kind, suffix):
    from backfill_lib.book import result_name

    with pytest.raises(ValueError, match="kind must be|suffix must be"):
        result_name("fashion_mnist", kind, suffix)


def test_a_dataset_without_committed_results_reads_none():
    from backfill_lib.book import dataset_result

    assert dataset_result("cifar100", "homogeneous") is None
    assert dataset_result("cifar100", "which_method_when", ".md") is None
