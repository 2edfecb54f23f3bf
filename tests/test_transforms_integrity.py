"""Transform files (issue 16): a damaged file is refused, never loaded as a different map; opening one
never imports a module named in it (the class registry); bad arguments get clear errors."""

import io
import math
import time

import numpy as np
import pytest
import torch

from backfill_lib import transforms
from backfill_lib.training import state_checksum
from backfill_lib.transforms import (FILE_FORMAT, FILE_VERSION, FittedTransform, ForwardTransform, ReverseTransform,
                                     register_transform, transform_class, transform_name)
from backfill_lib.validation import normalize_rows


def _unit(rng, n, d):
    return normalize_rows(rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def small():
    """A tiny forward transform (3 -> 2): its file is about 4 kB."""
    rng = np.random.default_rng(0)
    x, y = _unit(rng, 16, 3), _unit(rng, 16, 2)
    return x, ForwardTransform(steps=2, batch_size=8, device="cpu").fit(x, y)


@pytest.fixture(scope="module")
def psi():
    rng = np.random.default_rng(1)
    new, old = _unit(rng, 24, 4), _unit(rng, 24, 3)
    y = np.arange(24) % 3
    return new, ReverseTransform(objective="mc", learn_rho=True, steps=3, batch_size=8, device="cpu").fit(new, old, y)


def _blob(obj):
    return transforms._parse_blob(obj.to_bytes(), "not ours", "damaged")


def _forged(blob, **changes):
    """``blob`` changed and written with a checksum that matches the change (so only the other checks can refuse it)."""
    blob = {**blob, **changes}
    header = {key: blob.get(key) for key in ("class", "dims", "params")}
    buffer = io.BytesIO()
    torch.save({**blob, "checksum": state_checksum(blob["state_dict"], header)}, buffer)
    return buffer.getvalue()


def _version1(obj, drop=()):
    """The file the previous format (version 1: bare class name, no checksum) held for ``obj``."""
    blob = _blob(obj)
    blob = {"format": FILE_FORMAT, "version": 1, "class": type(obj).__name__, "backfill_lib_version": "0.1.0",
            "dims": blob["dims"], "params": {k: v for k, v in blob["params"].items() if k not in drop},
            "state_dict": blob["state_dict"]}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


# --- 1. damage is refused (the byte-flip sweep is in test_transforms_flips.py) ---------------------

def test_damage_message_says_what_to_do(small):
    _, h = small
    blob = _blob(h)
    state = {k: v.clone() for k, v in blob["state_dict"].items()}
    state["net.0.weight"][0, 0] += 1e-3
    buffer = io.BytesIO()
    torch.save({**blob, "state_dict": state}, buffer)  # checksum left as it was
    with pytest.raises(ValueError, match="^data is damaged: its weights do not match the checksum stored with them; "
                                         "re-fit or restore the file$"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")
    for key, value in (("params", {**blob["params"], "normalize": True}), ("dims", {"dim_in": 3, "dim_out": 3}),
                       ("class", "backfill_lib.transforms:ReverseTransform")):
        buffer = io.BytesIO()
        torch.save({**blob, key: value}, buffer)  # what decides the map is under the checksum too
        with pytest.raises(ValueError, match="do not match the checksum"):
            FittedTransform.from_bytes(buffer.getvalue(), device="cpu")


def test_non_finite_weights_are_refused_at_save_and_at_load(small, tmp_path):
    x, h = small
    blob = _blob(h)
    state = {k: v.clone() for k, v in blob["state_dict"].items()}
    state["net.3.bias"][0] = float("nan")
    with pytest.raises(ValueError, match=r"is damaged: its weights hold NaN or infinity \(in 'net.3.bias'\)"):
        ForwardTransform.from_bytes(_forged(blob, state_dict=state), device="cpu")
    broken = ForwardTransform.from_bytes(h.to_bytes(), device="cpu")
    with torch.no_grad():
        broken.module_.net[0].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite weights .*'net.0.weight'.*fit it again"):
        broken.save(tmp_path / "inf.pt")
    with pytest.raises(ValueError, match="non-finite weights"):
        broken.to_bytes()
    assert not (tmp_path / "inf.pt").exists()


# --- the previous format still loads ---------------------------------------------------------------

def test_version_1_files_load_with_a_warning_and_the_same_map(small, psi, tmp_path):
    x, h = small
    (tmp_path / "old.pt").write_bytes(_version1(h, drop=("arch",)))  # before arch existed: an MLP
    with pytest.warns(UserWarning, match=r"old.pt was written in transform format version 1, without a checksum: "
                                         "damage to it cannot be detected; save it again to add one"):
        back = ForwardTransform.load(tmp_path / "old.pt", device="cpu")
    assert back.get_params() == h.get_params()
    np.testing.assert_array_equal(back.transform(x), h.transform(x))
    new, p = psi
    with pytest.warns(UserWarning, match="without a checksum"):
        back = FittedTransform.from_bytes(_version1(p), device="cpu")
    assert type(back) is ReverseTransform
    np.testing.assert_array_equal(back.new_embedding(new), p.new_embedding(new))
    assert back.save(tmp_path / "resaved.pt") and _blob(back)["version"] == FILE_VERSION  # saving again upgrades


def test_version_1_files_with_nan_weights_are_refused(small):
    _, h = small
    blob = torch.load(io.BytesIO(_version1(h)), weights_only=True)
    blob["state_dict"]["net.0.weight"][0, 0] = float("nan")
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    with pytest.warns(UserWarning, match="without a checksum"), pytest.raises(ValueError, match="NaN or infinity"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_version_1_files_with_sparse_weights_are_refused(small):
    # before: a raw NotImplementedError from torch's sparse backend
    _, h = small
    blob = torch.load(io.BytesIO(_version1(h)), weights_only=True)
    blob["state_dict"]["net.0.bias"] = blob["state_dict"]["net.0.bias"].to_sparse()
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    with pytest.warns(UserWarning, match="without a checksum"), \
            pytest.raises(ValueError, match="^data is damaged: tensor 'net.0.bias' is stored as torch.sparse_coo"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")
    blob["version"] = 2
    buffer = io.BytesIO()
    torch.save(blob, buffer)  # a sparse tensor has no checksum: none can match
    with pytest.raises(ValueError, match="^data is damaged: its weights do not match the checksum"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")


@pytest.mark.parametrize("version", [0, -1, True, "2", 2.0, None])
def test_a_version_that_was_never_written_is_refused(small, version):
    with pytest.raises(ValueError, match=r"is damaged: its format version .* is not one backfill_lib writes"):
        FittedTransform.from_bytes(_forged(_blob(small[1]), version=version), device="cpu")


def test_a_checksum_is_checked_whatever_the_version_says(small):
    # a flip of the version byte (2 -> 1) must not switch the check off
    blob = _blob(small[1])
    state = {k: v.clone() for k, v in blob["state_dict"].items()}
    state["net.0.bias"][0] += 1.0
    buffer = io.BytesIO()
    torch.save({**blob, "version": 1, "state_dict": state}, buffer)
    with pytest.raises(ValueError, match="do not match the checksum"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")
    buffer = io.BytesIO()
    torch.save({k: v for k, v in blob.items() if k != "checksum"}, buffer)  # version 2 without its checksum
    with pytest.raises(ValueError, match="do not match the checksum"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")


# --- 3. bytes in memory, and the registry ------------------------------------------------------------

def test_to_bytes_and_from_bytes_round_trip_without_files(psi, tmp_path, monkeypatch):
    new, p = psi
    data = p.to_bytes()
    assert isinstance(data, bytes) and data == p.save(tmp_path / "p.pt").read_bytes()  # the same format as save

    def no_files(*args, **kwargs):
        raise AssertionError("from_bytes touched a file")
    monkeypatch.setattr(transforms.tempfile, "mkstemp", no_files)
    monkeypatch.setattr(transforms.tempfile, "NamedTemporaryFile", no_files)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: loads.append((f, kw)) or real_load(f, **kw))
    for data_like in (data, bytearray(data), memoryview(data)):
        back = ReverseTransform.from_bytes(data_like, device="cpu")
        np.testing.assert_array_equal(back.transform(new), p.transform(new))
        np.testing.assert_array_equal(back.new_embedding(new), p.new_embedding(new))
        assert back.get_params() == p.get_params() and not back.module_.training
    assert loads == []  # format 3 is raw arrays: torch's (restricted) unpickler is never called
    with pytest.raises(ValueError, match="^data holds a ReverseTransform, not a ForwardTransform"):
        ForwardTransform.from_bytes(data, device="cpu")


def test_loading_does_not_consume_the_global_random_stream(small):
    data = small[1].to_bytes()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    FittedTransform.from_bytes(data, device="cpu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("data, error, match", [
    ("h.pt", TypeError, r"^data must be bytes written by to_bytes\(\), got str: to read a file use load\(path\)$"),
    (None, TypeError, r"^data must be bytes written by to_bytes\(\), got NoneType$"),
    (np.zeros(3), TypeError, "^data must be bytes"),
    (b"", ValueError, "^data is not a transform written by ReverseTransform.save"),
    (b"PK\x03\x04 not really", ValueError, "^data is not a transform written by"),
])
def test_from_bytes_refuses_what_is_not_bytes_of_a_transform(data, error, match):
    with pytest.raises(error, match=match):
        FittedTransform.from_bytes(data)


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", [1], 2.5, True, "meta", torch.device("meta")])
def test_a_bad_device_is_blamed_on_the_device_not_the_file(small, tmp_path, device):
    path = small[1].save(tmp_path / "h.pt")
    for call in (lambda: FittedTransform.load(path, device=device),
                 lambda: FittedTransform.from_bytes(path.read_bytes(), device=device),
                 lambda: ForwardTransform(device=device)):
        with pytest.raises(ValueError, match="^device must be"):
            call()


@pytest.mark.skipif(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                    reason="checks the message on a machine without Apple's MPS")
def test_mps_without_mps_is_refused_before_loading(small):
    # before: accepted, then a RuntimeError from inside torch when the weights were moved
    with pytest.raises(ValueError, match="^device='mps' but Apple's MPS is not available here"):
        FittedTransform.from_bytes(small[1].to_bytes(), device="mps")


def test_a_folder_is_not_a_transform_file(small, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; give a file name, such as .*transform.pt"):
        small[1].save(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder, not a transform file"):
        FittedTransform.load(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", [None, 3, True])
def test_a_path_that_is_not_a_path_is_a_clear_error(small, path):
    with pytest.raises(TypeError, match="^path must be a file path"):
        FittedTransform.load(path)
    with pytest.raises(TypeError, match="^path must be a file path"):
        small[1].save(path)


@pytest.mark.parametrize("path", ["", "a\0b"])
def test_an_empty_path_is_a_clear_error(small, path):
    with pytest.raises(ValueError, match="^path must be a file path"):
        FittedTransform.load(path)
    with pytest.raises(ValueError, match="^path must be a file path"):
        small[1].save(path)


def test_library_classes_are_registered_under_the_names_index_files_store():
    for cls in (ReverseTransform, ForwardTransform):
        name = f"backfill_lib.transforms:{cls.__name__}"
        assert transform_name(cls) == name and transform_class(name) is cls
        assert register_transform(cls) == name  # registering again is fine
    assert transform_name(FittedTransform) is None and transform_name(int) is None
    assert transform_name("backfill_lib.transforms:ReverseTransform") is None


def test_unknown_names_are_refused_and_never_imported(monkeypatch):
    import importlib
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    with pytest.raises(ValueError, match=r"unknown transform class 'os:system'.*"
                                         r"backfill_lib.transforms.register_transform\(TheirClass\) before loading"):
        transform_class("os:system")
    with pytest.raises(TypeError, match="name must be a string, got int"):
        transform_class(3)
    assert imported == []


class _Psi(ReverseTransform):
    """A user's own transform, defined outside the library."""


class _Bytes:
    def to_bytes(self):
        return b""

    @classmethod
    def from_bytes(cls, data):
        return cls()


class _Files:
    def save(self, path):
        pass

    @classmethod
    def load(cls, path):
        return cls()


def test_a_user_class_loads_once_registered(psi):
    new, p = psi
    mine = _Psi(steps=3, batch_size=8, device="cpu").fit(new, p.transform(new))
    name = f"{__name__}:_Psi"
    data = mine.to_bytes()
    assert _blob(mine)["class"] == name
    transforms._REGISTRY.pop(name, None)
    transforms._NAMES.pop(_Psi, None)
    with pytest.raises(ValueError, match=rf"^data holds an unknown transform class '{name}'.*register_transform"):
        FittedTransform.from_bytes(data, device="cpu")
    try:
        assert register_transform(_Psi) == name and transform_name(_Psi) == name
        for loader in (FittedTransform, ReverseTransform, _Psi):  # a subclass loads through its bases too
            back = loader.from_bytes(data, device="cpu")
            assert type(back) is _Psi
            np.testing.assert_array_equal(back.transform(new), mine.transform(new))
        with pytest.raises(ValueError, match="holds a ReverseTransform, not a _Psi"):
            _Psi.from_bytes(p.to_bytes(), device="cpu")
    finally:
        transforms._REGISTRY.pop(name, None)
        transforms._NAMES.pop(_Psi, None)


def test_register_transform_checks_what_it_is_given(small):
    try:
        assert register_transform(_Bytes, "test:bytes") == "test:bytes" and transform_class("test:bytes") is _Bytes
        assert register_transform(_Files) == f"{__name__}:_Files"
        assert register_transform(_Bytes, "test:bytes-alias") == "test:bytes-alias"
        assert transform_name(_Bytes) == "test:bytes"  # files are written under the first name
        with pytest.raises(ValueError, match=r"name 'test:bytes' is already registered for .*_Bytes; register _Files "
                                             "under another name"):
            register_transform(_Files, "test:bytes")
        with pytest.raises(ValueError, match="already registered"):
            register_transform(_Files, "backfill_lib.transforms:ReverseTransform")
        with pytest.raises(ValueError, match="names 'test:bytes', a registered class that is not a FittedTransform"):
            FittedTransform.from_bytes(_forged(_blob(small[1]), **{"class": "test:bytes"}), device="cpu")
    finally:
        for name in ("test:bytes", "test:bytes-alias", f"{__name__}:_Files"):
            transforms._REGISTRY.pop(name, None)
        transforms._NAMES.pop(_Bytes, None)
        transforms._NAMES.pop(_Files, None)


class _NoClassMethod:
    def to_bytes(self):
        return b""

    def from_bytes(self, data):  # an instance method: a loader has no instance to call it on
        return self


@pytest.mark.parametrize("cls, match", [
    (ForwardTransform(), r"cls must be a transform class, got an instance of ForwardTransform \(pass its class"),
    (lambda data: None, "cls must be a transform class, got the function .*<lambda>"),
    (None, "cls must be a transform class, got an instance of NoneType"),
    ("backfill_lib.transforms:ReverseTransform", "got an instance of str"),
    (dict, r"dict cannot be registered as a transform: it needs a method to_bytes\(\) and a class method "
           r"from_bytes\(data\), or else a method save\(path\) and a class method load\(path\)"),
    (_NoClassMethod, "_NoClassMethod cannot be registered"),
])
def test_register_transform_refuses_what_is_not_a_transform_class(cls, match):
    with pytest.raises(TypeError, match=match):
        register_transform(cls)


@pytest.mark.parametrize("name, error, match", [(3, TypeError, "name must be a string, got int"),
                                                ("", ValueError, "name must not be empty"),
                                                ("  ", ValueError, "name must not be empty")])
def test_register_transform_refuses_bad_names(name, error, match):
    with pytest.raises(error, match=match):
        register_transform(_Bytes, name)


# --- 4. doctored files with a valid checksum: every check still names the problem ------------------

def test_huge_or_negative_sizes_are_refused_without_allocating(small):
    blob = _blob(small[1])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"is damaged: tensor 'net.0.weight' is torch.float32 of shape \(6, 3\), but "
                                         r"a ForwardTransform of sizes 1000000000 -> 2 has torch.float32 of shape "
                                         r"\(2000000000, 1000000000\)"):
        FittedTransform.from_bytes(_forged(blob, dims={"dim_in": 10 ** 9, "dim_out": 2}), device="cpu")
    assert time.perf_counter() - start < 5
    for dims, match in (({"dim_in": -3, "dim_out": 2}, "dim_in"), ({"dim_in": 3, "dim_out": 2.0}, "dim_out"),
                        ({"dim_in": True, "dim_out": 2}, "dim_in"), ({"dim_in": 3}, "sizes are not"),
                        ([3, 2], "sizes are not"), ({"dim_in": 3, "dim_out": 2, "x": 1}, "sizes are not")):
        with pytest.raises(ValueError, match=f"^data is damaged: .*{match}"):
            FittedTransform.from_bytes(_forged(blob, dims=dims), device="cpu")


def test_weights_that_do_not_fit_are_refused(small):
    blob = _blob(small[1])
    state = blob["state_dict"]
    extra = {**state, "net.9.weight": torch.zeros(2)}
    missing = {k: v for k, v in state.items() if k != "net.1.running_var"}
    as_double = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    not_tensors = {**state, "net.0.bias": [0.0] * 6}
    for bad, match in ((extra, r"do not fit .*unexpected \['net.9.weight'\], missing \[\]"),
                       (missing, r"missing \['net.1.running_var'\]"),
                       (as_double, "is torch.float64 of shape .* has torch.float32"),
                       ({**state, "net.0.weight": state["net.0.weight"].T.contiguous()}, r"shape \(3, 6\)")):
        with pytest.raises(ValueError, match=f"^data is damaged: .*{match}"):
            FittedTransform.from_bytes(_forged(blob, state_dict=bad), device="cpu")
    buffer = io.BytesIO()
    torch.save({**blob, "state_dict": not_tensors}, buffer)  # a list has no checksum: none can match
    with pytest.raises(ValueError, match="^data is damaged: its weights do not match the checksum"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")


@pytest.mark.parametrize("params, match", [
    ({"steps": "many"}, "its hyper-parameters are refused .*steps"),
    ({"normalize": 1}, "its hyper-parameters are refused .*normalize"),
    ({"arch": "transformer"}, "its hyper-parameters are refused .*arch"),
    ({"lr": math.nan}, "its hyper-parameters are refused .*lr"),
    ({"device": "cpu"}, r"hyper-parameters \['device'\] are not ones ForwardTransform saves"),
    ({"bogus": 1}, r"hyper-parameters \['bogus'\] are not ones"),
])
def test_hyper_parameters_of_the_wrong_kind_are_refused(small, params, match):
    blob = _blob(small[1])
    with pytest.raises(ValueError, match=f"^data is damaged: {match}"):
        FittedTransform.from_bytes(_forged(blob, params={**blob["params"], **params}), device="cpu")


def test_a_missing_hyper_parameter_is_not_replaced_by_its_default(small):
    # normalize=True saved, then lost: loading with the default False would refuse (or treat
    # differently) the very inputs the transform was saved to take
    x, h = small
    mine = ForwardTransform(steps=2, batch_size=8, device="cpu", normalize=True).fit(2 * x, x[:, :2] * 3)
    blob = _blob(mine)
    params = {k: v for k, v in blob["params"].items() if k != "normalize"}
    with pytest.raises(ValueError, match=r"^data is damaged: hyper-parameters \['normalize'\] are missing"):
        FittedTransform.from_bytes(_forged(blob, params=params), device="cpu")
    for params in ("steps=2", None, {1: 2}):
        with pytest.raises(ValueError, match="^data is damaged: its hyper-parameters are not a dict"):
            FittedTransform.from_bytes(_forged(blob, params=params), device="cpu")


@pytest.mark.parametrize("name", [None, 3, ["backfill_lib.transforms:ForwardTransform"]])
def test_a_class_name_that_is_not_a_string_is_refused(small, name):
    with pytest.raises(ValueError, match="^data is damaged: its class name .* is not a string"):
        FittedTransform.from_bytes(_forged(_blob(small[1]), **{"class": name}), device="cpu")


def test_a_format_2_file_written_by_torch_save_still_loads_with_weights_only(small, monkeypatch):
    # Format 2 was a torch.save file; it is read with torch.load(weights_only=True) and checked
    # against its checksum, which does not depend on the container.
    x, h = small
    blob = {**_blob(h), "version": 2}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: loads.append(kw) or real_load(f, **kw))
    back = ForwardTransform.from_bytes(buffer.getvalue(), device="cpu")
    np.testing.assert_array_equal(back.transform(x), h.transform(x))
    assert loads and all(kw.get("weights_only") is True for kw in loads)
    # and a checksum that does not match is refused in that container too
    blob["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    with pytest.raises(ValueError, match="damaged: its weights do not match the checksum"):
        ForwardTransform.from_bytes(buffer.getvalue(), device="cpu")


def test_an_npz_holding_a_pickled_array_is_refused_without_unpickling(small):
    # np.load(allow_pickle=False): an object array in the archive is refused, never unpickled
    x, h = small
    data = h.to_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["t0"] = np.array([object()], dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with pytest.raises(ValueError, match="data is damaged"):
        FittedTransform.from_bytes(buffer.getvalue(), device="cpu")
