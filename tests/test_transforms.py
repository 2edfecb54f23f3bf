"""Transformations ψ, h, ρ (METHOD §2, §3.4, §3.5): shapes, clear errors, identity start, learning."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from backfill_lib.transforms import (CompatibilityHeads, MLPTransform, ResidualEmbedding, TRANSFORM_CONFIG,
                                     apply_transform, fit_forward_transform, fit_reverse_transform,
                                     forward_transformation, reverse_transformation)
from backfill_lib.validation import normalize_rows


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mlp_transform_shapes_and_unit_output():
    psi = reverse_transformation(d_new=6, d_old=4)
    assert isinstance(psi, MLPTransform) and (psi.d_in, psi.d_out) == (6, 4)
    assert psi.net[0].out_features == 12  # hidden 2·max(d_o, d_n)
    out = apply_transform(psi, _unit(np.random.default_rng(0), 5, 6))
    assert out.shape == (5, 4) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((3, 5)), np.zeros(6), np.zeros((2, 3, 6))])
def test_apply_transform_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="dimension|2-D"):
        apply_transform(forward_transformation(d_old=6, d_new=4), bad, name="old")


def test_modules_reject_wrong_input_dimension():
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        reverse_transformation(6, 4)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        ResidualEmbedding(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positive integer"):
        reverse_transformation(0, 4)


def test_residual_embedding_starts_at_identity():
    z = _unit(np.random.default_rng(1), 7, 5)
    np.testing.assert_allclose(apply_transform(ResidualEmbedding(5), z), z, atol=1e-6)


def test_fit_checks_inputs():
    rng = np.random.default_rng(0)
    new, old, y = _unit(rng, 20, 6), _unit(rng, 20, 4), np.arange(20) % 2
    with pytest.raises(ValueError, match="same images"):
        fit_reverse_transform(new, old[:10])
    with pytest.raises(ValueError, match="needs labels"):
        fit_reverse_transform(new, old, objective="mc")
    with pytest.raises(ValueError, match="learn_rho"):
        fit_reverse_transform(new, old, y, objective="rt", learn_rho=True)
    with pytest.raises(ValueError, match="negatives"):
        fit_reverse_transform(new, old, y, objective="mc", negatives="some")
    with pytest.raises(ValueError, match="labels has 3"):
        fit_reverse_transform(new, old, y[:3], objective="mc")


def _rotated_pair(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a = _unit(rng, n, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return a, (a @ q).astype(np.float32)


FAST = replace(TRANSFORM_CONFIG, batch_size=128, lr=1e-2)
STEPS = 80


def test_forward_transform_learns_a_rotation():
    old, new = _rotated_pair()
    h = fit_forward_transform(old, new, config=FAST, steps=STEPS, device="cpu")
    cos = (apply_transform(h, old) * new).sum(axis=1)
    assert cos.mean() > 0.9


def test_reverse_transform_learns_a_rotation_and_only_psi_exists():
    new, old = _rotated_pair(seed=1)
    heads = fit_reverse_transform(new, old, config=FAST, steps=STEPS, device="cpu")
    assert heads.rho is None
    assert (apply_transform(heads.psi, new) * old).sum(axis=1).mean() > 0.9


def test_metric_compatible_fit_trains_psi_and_rho_from_identity():
    rng = np.random.default_rng(2)
    y = np.arange(200) % 4
    new = _unit(rng, 200, 6) * 0.5 + np.eye(4, 6, dtype=np.float32)[y]
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    old = _unit(rng, 200, 4) * 0.5 + np.eye(4, dtype=np.float32)[y]
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    start = CompatibilityHeads(6, 4, learn_rho=True)
    heads = fit_reverse_transform(new, old, y, objective="mc", learn_rho=True, config=FAST, steps=20,
                                  device="cpu")
    assert heads.rho.residual[-1].weight.abs().sum() > 0  # ρ moved away from the identity
    psi_q = apply_transform(heads.psi, new)
    same = y[:, None] == y[None, :]
    cross = psi_q @ old.T                                # transformed query vs old-stored items
    assert cross[same].mean() > cross[~same].mean() + 0.5
    assert start.rho.residual[-1].weight.abs().sum() == 0


def test_schedule_counts_optimiser_steps():
    from backfill_lib.transforms import schedule
    assert schedule(TRANSFORM_CONFIG, n_items=900, steps=1000).epochs == 334   # 3 full batches of 256 per epoch
    assert schedule(TRANSFORM_CONFIG, n_items=100, steps=50).epochs == 50      # one (partial) batch per epoch
    assert schedule(TRANSFORM_CONFIG, n_items=100, steps=None) == TRANSFORM_CONFIG
    with pytest.raises(ValueError, match="steps"):
        schedule(TRANSFORM_CONFIG, n_items=100, steps=0)


# --- one sample, heads passed whole, rows off unit norm (issue 7, section 2) ---------------------

@pytest.mark.parametrize("fit", [lambda a, b: fit_reverse_transform(a, b), lambda a, b: fit_forward_transform(a, b)])
def test_fit_on_one_sample_is_a_clear_error(fit):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 training images"):
        fit(_unit(rng, 1, 6), _unit(rng, 1, 4))


def test_apply_transform_refuses_the_heads_and_says_which_head_to_pass():
    heads = CompatibilityHeads(6, 4, learn_rho=True)
    with pytest.raises(TypeError, match=r"heads\.psi.*heads\.rho"):
        apply_transform(heads, _unit(np.random.default_rng(0), 3, 6))
    with pytest.raises(TypeError, match="trained head"):
        apply_transform(torch.nn.Linear(6, 4), _unit(np.random.default_rng(0), 3, 6))


def test_rows_off_unit_norm_are_refused_unless_normalize():
    new, old = _rotated_pair(n=64, seed=3)
    with pytest.raises(ValueError, match="unit-norm.*normalize=True"):
        fit_reverse_transform(0.5 * new, old, steps=2, device="cpu")
    with pytest.raises(ValueError, match="unit-norm.*normalize=True"):
        fit_forward_transform(old, 0.5 * new, steps=2, device="cpu")
    with pytest.raises(ValueError, match="unit-norm"):
        apply_transform(reverse_transformation(8, 8), 0.5 * new)
    # normalize=True trains exactly as on the normalised rows (powers of two scale without rounding)
    a = fit_reverse_transform(0.5 * new, 4 * old, config=FAST, steps=5, device="cpu", normalize=True)
    b = fit_reverse_transform(normalize_rows(new), normalize_rows(old), config=FAST, steps=5, device="cpu")
    np.testing.assert_array_equal(apply_transform(a.psi, new), apply_transform(b.psi, new))


# --- ReverseTransform / ForwardTransform (issue 7, section 3) ------------------------------------

from backfill_lib import transforms  # noqa: E402
from backfill_lib.transforms import (FILE_VERSION, FittedTransform, ForwardTransform, NotFittedError,  # noqa: E402
                                     ReverseTransform)

QUICK = dict(steps=30, batch_size=64, lr=1e-2, device="cpu")


def _save_blob(blob, path):
    """Write a (doctored) transform blob with its checksum recomputed, as a careful forger would."""
    from backfill_lib.training import state_checksum
    header = {key: blob[key] for key in ("class", "dims", "params")}
    torch.save({**blob, "checksum": state_checksum(blob["state_dict"], header)}, path)


def _labelled(n=120, d_new=6, d_old=4, seed=0):
    """New and old embeddings of the same items, both clustered by label (so L_mc has something to learn)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    new = _unit(rng, n, d_new) * 0.5 + np.eye(3, d_new, dtype=np.float32)[y]
    old = _unit(rng, n, d_old) * 0.5 + np.eye(3, d_old, dtype=np.float32)[y]
    return (new / np.linalg.norm(new, axis=1, keepdims=True), old / np.linalg.norm(old, axis=1, keepdims=True), y)


@pytest.fixture(scope="module")
def fitted():
    new, old, y = _labelled()
    psi = ReverseTransform(objective="mc", learn_rho=True, lam_rt=0.5, **QUICK).fit(new, old, y)
    h = ForwardTransform(**QUICK).fit(old, new)
    return new, old, y, psi, h


def test_order_is_input_then_target_for_both_classes(fitted):
    new, old, _, psi, h = fitted
    assert (psi.dim_in_, psi.dim_out_) == (6, 4) and psi.transform(new).shape == (len(new), 4)
    assert (h.dim_in_, h.dim_out_) == (4, 6) and h.transform(old).shape == (len(old), 6)
    assert psi.new_embedding(new).shape == (len(new), 6)
    with pytest.raises(ValueError, match=r"X \(new embeddings\) has dimension 4 but 6"):
        psi.transform(old)
    with pytest.raises(ValueError, match=r"X \(old embeddings\) has dimension 6 but 4"):
        h.transform(new)


def test_equal_dims_each_class_learns_the_map_its_docstring_names():
    # with equal widths a swapped order would fit silently: check the direction that was learned
    a, b = _rotated_pair(seed=4)                       # b = a @ Q
    fwd = ForwardTransform(steps=STEPS, batch_size=128, lr=1e-2, device="cpu").fit(a, b)  # a → b
    rev = ReverseTransform(steps=STEPS, batch_size=128, lr=1e-2, device="cpu").fit(b, a)  # b → a
    assert (fwd.transform(a) * b).sum(axis=1).mean() > 0.9
    assert (rev.transform(b) * a).sum(axis=1).mean() > 0.9
    assert (fwd.transform(a) * a).sum(axis=1).mean() < 0.5   # not the other direction


def test_objects_match_the_functions_they_wrap():
    new, old, y = _labelled(seed=5)
    config = replace(TRANSFORM_CONFIG, batch_size=64, lr=1e-2, seed=3)
    heads = fit_reverse_transform(new, old, y, "mc", True, 0.2, 0.5, "both", config, 30, "cpu")
    psi = ReverseTransform("mc", True, 0.2, 0.5, "both", steps=30, batch_size=64, lr=1e-2, seed=3,
                           device="cpu").fit(new, old, y)
    np.testing.assert_array_equal(psi.transform(new), apply_transform(heads.psi, new))
    np.testing.assert_array_equal(psi.new_embedding(new), apply_transform(heads.rho, new))
    h = fit_forward_transform(old, new, config, 30, "cpu")
    np.testing.assert_array_equal(ForwardTransform(steps=30, batch_size=64, lr=1e-2, seed=3, device="cpu")
                                  .fit(old, new).transform(old), apply_transform(h, old))


def test_fit_is_reproducible_with_seed():
    new, old, _ = _labelled(seed=6)
    runs = [ReverseTransform(seed=s, **QUICK).fit(new, old).transform(new) for s in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_save_load_round_trip_gives_identical_outputs(fitted, tmp_path):
    new, old, _, psi, h = fitted
    for obj, x in ((psi, new), (h, old)):
        path = obj.save(tmp_path / f"{type(obj).__name__}.pt")
        back = type(obj).load(path, device="cpu")
        assert type(back) is type(obj) and back.get_params() == obj.get_params()
        assert (back.dim_in_, back.dim_out_) == (obj.dim_in_, obj.dim_out_)
        np.testing.assert_array_equal(back.transform(x), obj.transform(x))
        assert type(FittedTransform.load(path, device="cpu")) is type(obj)  # the base loads either kind
    back = ReverseTransform.load(tmp_path / "ReverseTransform.pt", device="cpu")
    np.testing.assert_array_equal(back.new_embedding(new), psi.new_embedding(new))
    assert not back.module_.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ForwardTransform.pt", "ReverseTransform.pt"]  # no temp files


def test_saved_file_loads_safely_and_holds_its_metadata(fitted, tmp_path):
    psi = fitted[3]
    path = psi.save(tmp_path / "psi.pt")
    with np.load(path, allow_pickle=False) as archive:  # raw arrays only: no pickle anywhere
        assert all(archive[key].dtype != object for key in archive.files)
    blob = transforms._parse_blob(path.read_bytes(), "not ours", "damaged")
    assert blob["class"] == "backfill_lib.transforms:ReverseTransform" and blob["version"] == FILE_VERSION == 3
    assert isinstance(blob["checksum"], str) and len(blob["checksum"]) == 64
    assert blob["dims"] == {"dim_in": 6, "dim_out": 4}
    assert blob["params"]["objective"] == "mc" and blob["params"]["learn_rho"] is True
    assert "device" not in blob["params"]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_transform_takes_any_float_dtype(fitted, dtype):
    new, old, _, psi, h = fitted
    for obj, x in ((psi, new), (h, old)):
        ref = obj.transform(x)
        out = obj.transform(x.astype(dtype))
        assert out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(out, ref, atol=5e-3 if dtype == np.float16 else 0)


def test_fit_takes_float64_and_normalize_switch(fitted):
    new, old, y, _, _ = fitted
    a = ReverseTransform(**QUICK).fit(new.astype(np.float64), old.astype(np.float64))
    b = ReverseTransform(**QUICK).fit(new, old)
    np.testing.assert_array_equal(a.transform(new), b.transform(new))
    with pytest.raises(ValueError, match="unit-norm.*normalize=True"):
        b.transform(2 * new)
    c = ReverseTransform(normalize=True, **QUICK).fit(2 * new, 0.5 * old)
    d = ReverseTransform(**QUICK).fit(normalize_rows(new), normalize_rows(old))
    np.testing.assert_array_equal(c.transform(2 * new), d.transform(normalize_rows(new)))


def test_not_fitted_is_a_clear_error(tmp_path):
    psi = ReverseTransform()
    assert not psi.fitted
    for call in (lambda: psi.transform(np.eye(2)), lambda: psi.new_embedding(np.eye(2)),
                 lambda: psi.save(tmp_path / "x.pt"), lambda: ForwardTransform().transform(np.eye(2))):
        with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
            call()
    assert issubclass(NotFittedError, ValueError)
    assert not (tmp_path / "x.pt").exists()


def test_fit_input_errors_name_the_argument():
    new, old, y = _labelled(n=20)
    with pytest.raises(ValueError, match=r"X \(new embeddings\) has 20 rows but Y \(old embeddings\) has 10"):
        ReverseTransform(**QUICK).fit(new, old[:10])
    with pytest.raises(ValueError, match="needs labels"):
        ReverseTransform(objective="mc", **QUICK).fit(new, old)
    with pytest.raises(ValueError, match="labels has 3"):
        ReverseTransform(objective="mc", **QUICK).fit(new, old, y[:3])
    for obj, a, b in ((ReverseTransform(**QUICK), new, old), (ForwardTransform(**QUICK), old, new)):
        with pytest.raises(ValueError, match="at least 2 training images"):
            obj.fit(a[:1], b[:1])
        with pytest.raises(ValueError, match=r"^X must have unit-norm rows.*normalize_rows\(X\)"):
            obj.fit(3 * a, b)
        with pytest.raises(ValueError, match=r"^Y must have unit-norm rows"):
            obj.fit(a, 3 * b)
        with pytest.raises(TypeError, match="complex"):
            obj.fit(a.astype(np.complex64), b)
        assert not obj.fitted


@pytest.mark.parametrize("kwargs, error, match", [
    ({"objective": "ce"}, ValueError, "objective"),
    ({"learn_rho": True}, ValueError, "learn_rho needs objective='mc'"),
    ({"negatives": "all", "objective": "mc"}, ValueError, "negatives"),
    ({"tau": 0}, ValueError, "tau"),
    ({"lam_rt": -1}, ValueError, "lam_rt"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.5}, ValueError, "steps"),
    ({"batch_size": 1}, ValueError, "batch_size"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"seed": -1}, ValueError, "seed"),
    ({"normalize": "yes"}, TypeError, "normalize"),
    ({"device": "foo"}, ValueError, "device"),
])
def test_bad_hyper_parameters_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReverseTransform(**kwargs)
    forward_kwargs = {k: v for k, v in kwargs.items() if k not in ("objective", "learn_rho", "negatives", "tau", "lam_rt")}
    if forward_kwargs:
        with pytest.raises(error, match=match):
            ForwardTransform(**forward_kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no GPU"):
        ForwardTransform(device="cuda")


def test_load_errors_name_the_file_and_the_fix(fitted, tmp_path):
    psi, h = fitted[3], fitted[4]
    with pytest.raises(FileNotFoundError, match="no transform file"):
        ReverseTransform.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")           # a torch file of another kind
    torch.save(replace(TRANSFORM_CONFIG), tmp_path / "pickled.pt")               # unsafe to load: a pickled object
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("text.pt", "state_dict.pt", "pickled.pt", "empty.pt"):
        with pytest.raises(ValueError, match=f"{name} is not a transform file"):
            ReverseTransform.load(tmp_path / name)
    h.save(tmp_path / "h.pt")
    with pytest.raises(ValueError, match="holds a ForwardTransform, not a ReverseTransform: load it with ForwardTransform.load"):
        ReverseTransform.load(tmp_path / "h.pt")
    blob = transforms._parse_blob(psi.save(tmp_path / "psi.pt").read_bytes(), "not ours", "damaged")
    torch.save({**blob, "version": FILE_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="newer than this backfill_lib reads.*upgrade backfill_lib"):
        ReverseTransform.load(tmp_path / "newer.pt")
    torch.save({**blob, "dims": {"dim_in": 5, "dim_out": 4}}, tmp_path / "bad_dims.pt")
    with pytest.raises(ValueError, match="bad_dims.pt is damaged: its weights do not match the checksum stored "
                                         "with them; re-fit or restore the file"):
        ReverseTransform.load(tmp_path / "bad_dims.pt")
    _save_blob({**blob, "dims": {"dim_in": 5, "dim_out": 4}}, tmp_path / "bad_dims.pt")  # checksum recomputed
    with pytest.raises(ValueError, match=r"bad_dims.pt is damaged: tensor .* but a ReverseTransform of sizes 5 -> 4"):
        ReverseTransform.load(tmp_path / "bad_dims.pt")
    _save_blob({**blob, "class": "Mystery"}, tmp_path / "mystery.pt")
    with pytest.raises(ValueError, match=r"unknown transform class 'Mystery'.*register_transform\(TheirClass\)"):
        FittedTransform.load(tmp_path / "mystery.pt")


def test_save_is_atomic(fitted, tmp_path, monkeypatch):
    new, _, _, psi, _ = fitted
    path = psi.save(tmp_path / "psi.pt")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(transforms.os, "fsync", crash)  # the temp file is written, then the disk fails
    with pytest.raises(OSError, match="disk full"):
        psi.save(path)
    assert path.read_bytes() == before                          # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["psi.pt"]   # and no temp file is left behind
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        psi.save(tmp_path / "no" / "such" / "psi.pt")


# --- the numpy path for a few queries (issue 19: fast single queries) ------------------------------

def test_numpy_path_equals_torch_and_follows_training():
    import numpy as np
    import torch

    from backfill_lib.transforms import NUMPY_MAX_ROWS, ReverseTransform, apply_transform, _numpy_mlp
    from backfill_lib.validation import normalize_rows

    rng = np.random.default_rng(3)
    x_new = normalize_rows(rng.normal(size=(400, 12)).astype(np.float32))
    x_old = normalize_rows(rng.normal(size=(400, 6)).astype(np.float32))
    psi = ReverseTransform(steps=30, seed=1).fit(x_new, x_old)
    module = psi.module_.psi
    q = x_new[:5]
    fast = psi.transform(q)                               # numpy path (5 rows)
    assert len(q) <= NUMPY_MAX_ROWS and _numpy_mlp(module) is not None
    module.eval()
    with torch.no_grad():
        slow = module(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(fast, slow, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-6)
    # a change of the weights (a training step, a load) is seen: the cache is rebuilt
    with torch.no_grad():
        module.net[0].weight.add_(0.5)
        module.net[1].running_mean.add_(0.1)
        slow2 = module(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(psi.transform(q), slow2, atol=2e-6)
    assert np.abs(slow2 - slow).max() > 1e-3
    # a large batch takes torch's path and agrees
    big = x_new[:NUMPY_MAX_ROWS + 10]
    np.testing.assert_allclose(apply_transform(module, big)[:5], psi.transform(q), atol=2e-6)


def test_numpy_path_sees_a_replaced_parameter():
    import numpy as np
    import torch

    from backfill_lib.transforms import ReverseTransform
    from backfill_lib.validation import normalize_rows

    rng = np.random.default_rng(4)
    x_new = normalize_rows(rng.normal(size=(300, 8)).astype(np.float32))
    psi = ReverseTransform(steps=20, seed=2).fit(x_new, normalize_rows(rng.normal(size=(300, 5)).astype(np.float32)))
    before = psi.transform(x_new[:3])
    layer = psi.module_.psi.net[3]
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight))     # a new tensor, not an in-place change
    layer.bias = torch.nn.Parameter(torch.ones_like(layer.bias))
    after = psi.transform(x_new[:3])
    np.testing.assert_allclose(after, np.full_like(after, 1 / np.sqrt(5)), atol=1e-6)
    assert np.abs(after - before).max() > 1e-2
