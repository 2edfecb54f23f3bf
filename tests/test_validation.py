"""Input checks at the public boundary: every error names the argument."""

import collections

import numpy as np
import pytest
import torch

from backfill_lib.validation import (UNIT_NORM_TOL, as_embeddings, as_labels, check_choice, check_k, check_ratio,
                                     check_ratios, normalize_rows, repeated)


class TestAsEmbeddings:
    def test_list_becomes_contiguous_float32_matrix(self):
        out = as_embeddings([[1, 2], [3, 4]], "x")
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, [[1, 2], [3, 4]])

    def test_torch_tensor_and_fortran_array_accepted(self):
        t = torch.arange(6, dtype=torch.float64).reshape(3, 2)
        np.testing.assert_array_equal(as_embeddings(t, "x"), t.numpy())
        f = np.asfortranarray(np.ones((3, 2)))
        assert as_embeddings(f, "x").flags.c_contiguous

    def test_dim_checked(self):
        assert as_embeddings(np.ones((2, 3)), "gallery", dim=3).shape == (2, 3)
        with pytest.raises(ValueError, match=r"queries has dimension 2 but 3 is expected"):
            as_embeddings(np.ones((2, 2)), "queries", dim=3)

    def test_one_dimensional_rejected_with_hint(self):
        with pytest.raises(ValueError, match=r"queries must be a 2-D array.*x\[None, :\]"):
            as_embeddings(np.ones(3), "queries")

    def test_empty(self):
        with pytest.raises(ValueError, match="gallery is empty"):
            as_embeddings(np.zeros((0, 3)), "gallery")
        assert as_embeddings(np.zeros((0, 3)), "gallery", allow_empty=True).shape == (0, 3)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_rejected_and_rows_counted(self, bad):
        x = np.ones((4, 2))
        x[1, 0] = bad
        x[3, 1] = bad
        with pytest.raises(ValueError, match=r"new_vectors contains NaN or infinite values in 2 row"):
            as_embeddings(x, "new_vectors")

    @pytest.mark.parametrize("bad", [[["a", "b"]], np.array([[object()]], dtype=object)])
    def test_non_numeric_is_type_error(self, bad):
        with pytest.raises(TypeError, match="old_vectors must be an array of numbers"):
            as_embeddings(bad, "old_vectors")

    def test_ragged_is_type_error(self):
        with pytest.raises(TypeError, match="x must be an array of numbers"):
            as_embeddings([[1.0, 2.0], [3.0]], "x")


class TestAsLabels:
    def test_integral_floats_and_tensors(self):
        np.testing.assert_array_equal(as_labels([0.0, 2.0], "y"), [0, 2])
        assert as_labels(torch.tensor([1, 2]), "y").dtype == np.int64

    def test_errors_name_argument(self):
        with pytest.raises(TypeError, match="query_labels must hold integer class labels"):
            as_labels([0.5, 1.0], "query_labels")
        with pytest.raises(ValueError, match="labels must be 1-D"):
            as_labels([[0, 1]], "labels")
        with pytest.raises(ValueError, match="gallery_labels has 2 labels but there are 3 items"):
            as_labels([0, 1], "gallery_labels", n=3)


class TestRatios:
    @pytest.mark.parametrize("r", [0, 1, 0.5, np.float32(0.25), np.int64(1)])
    def test_valid(self, r):
        assert check_ratio(r) == float(r)

    @pytest.mark.parametrize("r", [-0.1, 1.0001, np.nan, np.inf])
    def test_outside_unit_interval(self, r):
        with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\]"):
            check_ratio(r)

    @pytest.mark.parametrize("r", ["0.5", None, True])
    def test_not_a_number(self, r):
        with pytest.raises(TypeError, match="ratio must be a number"):
            check_ratio(r)

    def test_ratios_sorted_unique_and_indexed_errors(self):
        np.testing.assert_array_equal(check_ratios([1, 0, 0.5, 0.5]), [0, 0.5, 1])
        with pytest.raises(ValueError, match=r"ratios\[1\] must lie in \[0, 1\]"):
            check_ratios([0, 2])
        with pytest.raises(ValueError, match="ratios is empty"):
            check_ratios([])


class TestK:
    def test_valid(self):
        assert check_k(np.int64(3), 3) == 3

    def test_larger_than_gallery(self):
        with pytest.raises(ValueError, match=r"k=6 is larger than the gallery \(5 items searchable\)"):
            check_k(6, 5)

    @pytest.mark.parametrize("k,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
    def test_bad_k(self, k, exc):
        with pytest.raises(exc, match="k must be"):
            check_k(k, 10)


def test_check_choice():
    assert check_choice("a", ("a", "b"), "policy") == "a"
    with pytest.raises(ValueError, match="unknown policy 'c'; choose one of: a, b"):
        check_choice("c", ("a", "b"), "policy")


class TestUnitNorm:
    def test_unit_rows_accepted_unchanged(self, rng):
        x = rng.normal(size=(5, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_array_equal(as_embeddings(x, "x", unit_norm=True), x.astype(np.float32))

    def test_tolerance_is_unit_norm_tol(self):
        inside, outside = 1 + 0.9 * UNIT_NORM_TOL, 1 + 1.1 * UNIT_NORM_TOL
        as_embeddings([[inside, 0.0], [0.0, 1 - 0.9 * UNIT_NORM_TOL]], "x", unit_norm=True)
        with pytest.raises(ValueError, match="x must have unit-norm rows"):
            as_embeddings([[outside, 0.0]], "x", unit_norm=True)

    def test_half_norm_refused_with_row_norm_and_advice(self):
        x = np.eye(3)
        x[2] *= 0.5
        with pytest.raises(ValueError, match=r"new must have unit-norm rows .* 1 row\(s\) are not, e.g. row 2 has "
                                             r"norm 0\.5: .*normalize_rows\(new\)"):
            as_embeddings(x, "new", unit_norm=True)
        assert as_embeddings(x, "new").shape == (3, 3)  # without unit_norm, any norm passes

    def test_zero_row_is_off_unit_norm(self):
        with pytest.raises(ValueError, match="row 1 has norm 0"):
            as_embeddings([[1.0, 0.0], [0.0, 0.0]], "g", unit_norm=True)

    def test_empty_with_allow_empty(self):
        assert as_embeddings(np.zeros((0, 4)), "x", allow_empty=True, unit_norm=True).shape == (0, 4)

    def test_complex_refused_even_with_zero_imaginary_part(self):
        with pytest.raises(TypeError, match="queries must be real-valued, got complex dtype complex128"):
            as_embeddings(np.eye(2, dtype=np.complex128), "queries", unit_norm=True)

    def test_zero_columns_refused(self):
        with pytest.raises(ValueError, match="gallery has 0 columns"):
            as_embeddings(np.zeros((3, 0)), "gallery", unit_norm=True)
        with pytest.raises(ValueError, match="gallery has 0 columns"):
            as_embeddings(np.zeros((0, 0)), "gallery", allow_empty=True)

    def test_nan_refused_before_the_norm_check(self):
        with pytest.raises(ValueError, match="x contains NaN or infinite values in 1 row"):
            as_embeddings([[np.nan, 0.0]], "x", unit_norm=True)


class TestNormalizeRows:
    def test_unit_norm_same_direction(self, rng):
        x = rng.normal(size=(6, 4)) * rng.uniform(0.01, 100, size=(6, 1))
        out = normalize_rows(x)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == x.shape
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(out * np.linalg.norm(x, axis=1, keepdims=True), x, rtol=1e-5)
        as_embeddings(out, "out", unit_norm=True)  # passes the check it is meant to satisfy

    def test_half_norm_becomes_unit_and_is_idempotent(self, rng):
        x = rng.normal(size=(5, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(normalize_rows(0.5 * x), x, atol=1e-6)
        np.testing.assert_allclose(normalize_rows(normalize_rows(x)), normalize_rows(x), atol=1e-7)

    def test_large_and_small_float32_values(self):
        np.testing.assert_allclose(normalize_rows([[3e38, 3e38]]), [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
        np.testing.assert_allclose(normalize_rows([[3e-38, -4e-38]]), [[0.6, -0.8]], rtol=1e-5)

    def test_torch_tensor(self):
        out = normalize_rows(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
        np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)

    def test_zero_row_refused_and_counted(self):
        with pytest.raises(ValueError, match=r"new_vectors has 2 all-zero row\(s\): they cannot be normalised"):
            normalize_rows([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], "new_vectors")

    @pytest.mark.parametrize("bad,exc,message", [
        (np.eye(2, dtype=np.complex64), TypeError, "x must be real-valued"),
        (np.zeros((2, 0)), ValueError, "x has 0 columns"),
        (np.array([[1.0, np.nan]]), ValueError, "x contains NaN or infinite values"),
        (np.array([[np.inf, 1.0]]), ValueError, "x contains NaN or infinite values"),
        (np.zeros((0, 3)), ValueError, "x is empty"),
        (np.ones(3), ValueError, "x must be a 2-D array"),
        ([["a"]], TypeError, "x must be an array of numbers"),
    ])
    def test_bad_input(self, bad, exc, message):
        with pytest.raises(exc, match=message):
            normalize_rows(bad)


@pytest.mark.parametrize("seed", range(5))
def test_repeated_equals_counting(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 40, size=rng.integers(0, 60))
    counts = collections.Counter(values.tolist())
    assert repeated(values).tolist() == sorted(v for v, c in counts.items() if c > 1)



@pytest.mark.parametrize("value, want", [("a/b.npz", "a/b.npz"), (b"a/b.npz", "a/b.npz"),
                                         (__import__("pathlib").Path("x") / "y", "x/y")])
def test_check_path_returns_a_str(value, want):
    from backfill_lib.validation import check_path
    assert check_path(value) == want


@pytest.mark.parametrize("value, error", [(None, TypeError), (3, TypeError), (True, TypeError), (1.5, TypeError),
                                          ("", ValueError), ("a\0b", ValueError), (b"", ValueError)])
def test_check_path_refuses_what_is_not_a_path(value, error):
    from backfill_lib.validation import check_path
    with pytest.raises(error, match="^state_path must be a file path"):
        check_path(value, "state_path")
