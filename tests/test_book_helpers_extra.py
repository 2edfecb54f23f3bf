"""The chapters' shared helpers of backfill_lib.book: tables, mean ± std, source listings."""

import ast

import pytest
from IPython.display import Markdown

from backfill_lib import book
from backfill_lib.book import markdown_table, mean_std, show_source, source_of
from backfill_lib.losses import reverse_loss


def _sample(x, y):
    """A docstring that must go.

    With "quotes" and ''' inside.
    """
    if x < 0:
        raise ValueError("x must be >= 0")
    if y < 0:
        raise ValueError("y must be >= 0")
    text = '"""not a docstring"""'  # a string in the code stays
    if x > y:
        x = y
    return x + y, text


class _Sampled:
    """Class docstring."""

    def method(self, z):
        """Method docstring."""
        if z is None:
            raise TypeError("z is None")
        return z


class TestMarkdownTable:
    def test_known_table(self):
        text = markdown_table([["a", 0.12345, 3], ["b|c", 1.0, "x"]], ["name", "value", "n"],
                              floatfmt=".2f", align=["left", "right", "center"], as_string=True)
        assert text.splitlines() == ["| name | value | n |", "| --- | ---: | :---: |",
                                     "| a | 0.12 | 3 |", "| b\\|c | 1.00 | x |"]

    def test_numpy_floats_and_markdown_object(self):
        import numpy as np

        out = markdown_table([[np.float32(0.5), np.int64(2)]], ["x", "k"])
        assert isinstance(out, Markdown) and out.data.splitlines()[2] == "| 0.500 | 2 |"

    def test_bad_input(self):
        with pytest.raises(ValueError, match="row 1 has 1 cells but there are 2 headers"):
            markdown_table([["a", 1], ["b"]], ["x", "y"])
        with pytest.raises(TypeError, match="swapped"):
            markdown_table(["x", "y"], [["a", 1]])
        with pytest.raises(ValueError, match="headers is empty"):
            markdown_table([], [])
        with pytest.raises(ValueError, match="align must give one of"):
            markdown_table([["a"]], ["x"], align=["middle"])


class TestMeanStd:
    def test_format(self):
        assert mean_std({"mean": 0.5, "std": 0.0123}) == "0.500 ± 0.012"
        assert mean_std({"mean": 1.23456, "std": 0.1}, digits=1) == "1.2 ± 0.1"

    def test_committed_result_entry(self):
        result = book.load_result("digits_homogeneous.json")
        gain = result["strategies"]["rank_merge"]["relative_gain"]
        assert mean_std(gain, 2) == f"{gain['mean']:.2f} ± {gain['std']:.2f}"
        with pytest.raises(ValueError, match="'mean', 'std'"):
            mean_std(result["strategies"]["rank_merge"])


class TestSource:
    def test_docstring_left_out_code_kept(self):
        src = source_of(_sample)
        assert "A docstring that must go" not in src and "quotes" not in src
        assert "text = '\"\"\"not a docstring\"\"\"'" in src  # quotes in the code are not a docstring
        assert src.splitlines()[1].strip().startswith("if x < 0")  # no blank line where the docstring was
        ast.parse(src)  # still valid Python
        assert "A docstring that must go" in source_of(_sample, docstring=True)

    def test_input_checks_left_out_once(self):
        src = source_of(_sample, input_checks=False)
        assert "raise" not in src and src.count("# (input checks left out)") == 1
        assert "if x > y:" in src  # an if that does not only raise is code, not a check
        ast.parse(src)
        method = source_of(_Sampled.method, input_checks=False)
        assert "Method docstring" not in method and "raise" not in method and "return z" in method

    def test_class_and_library_function(self):
        cls = source_of(_Sampled)
        assert "Class docstring" not in cls and "Method docstring" not in cls and "def method" in cls
        lib = source_of(reverse_loss)
        assert lib.startswith("def reverse_loss") and '"""' not in lib

    def test_show_source_prints(self, capsys):
        show_source(_sample, input_checks=False)
        assert capsys.readouterr().out.rstrip() == source_of(_sample, input_checks=False)

    def test_no_source(self):
        with pytest.raises(TypeError, match="cannot find the source"):
            source_of(len)
