"""Datasets of METHOD §6, all offline: digits, synthetic, a fake CIFAR-100 and generated image trees."""

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from backfill_lib.data import (DataNotFoundError, data_root, file_fingerprint, format_classes, load_dataset,
                               make_synthetic, parse_classes)
from fake_cifar import write_fake_cifar100


class TestClasses:
    @pytest.mark.parametrize("spec,expected", [
        ("0-4", (0, 1, 2, 3, 4)), ("0,2,5", (0, 2, 5)), ("0-2,5", (0, 1, 2, 5)), (" 3 , 1,", (1, 3)),
        ("7", (7,)), ([2, 0, 2], (0, 2)), (range(3), (0, 1, 2)), (np.array([4, 1]), (1, 4)),
    ])
    def test_parse(self, spec, expected):
        assert parse_classes(spec) == expected

    @pytest.mark.parametrize("text", ["0-2,5", "0-4", "1,3,5", "0-1,3-4,9"])
    def test_format_is_inverse_of_parse(self, text):
        assert format_classes(parse_classes(text)) == text

    def test_format(self):
        assert format_classes((5, 0, 1, 2)) == "0-2,5"
        assert format_classes([4]) == "4"

    @pytest.mark.parametrize("spec,match", [
        ("a-b", "old_classes: cannot parse 'a-b'"), ("4-2", "old_classes: cannot parse '4-2'"),
        ("", "old_classes is empty"), ([], "old_classes is empty"),
        ("0-10", r"old_classes 0-10 out of range: classes are 0..9"),
        ("0-9", "old_classes covers every class"),
    ])
    def test_bad_specs(self, spec, match):
        with pytest.raises(ValueError, match=match):
            parse_classes(spec, num_classes=10)

    def test_not_a_sequence(self):
        with pytest.raises(TypeError, match="old_classes must be a string like '0-4' or a sequence of ints"):
            parse_classes(5)


def _class_shares(labels, n_classes):
    return np.bincount(labels, minlength=n_classes) / len(labels)


class TestDigits:
    def test_shapes_and_defaults(self):
        d = load_dataset("digits")
        assert d.name == "digits" and d.num_classes == 10 and d.old_classes == (0, 1, 2, 3, 4)
        assert d.input_shape == (1, 8, 8)
        assert len(d.train_labels) + len(d.test_labels) == 1797
        x, y = d.train[0]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and int(y) == d.train_labels[0]
        assert d.train_plain is d.train  # no augmentation for digits
        assert len(d.test) == len(d.test_labels)
        assert "old model sees 0-4" in d.describe()

    def test_split_is_stratified_and_seeded(self):
        a, b, c = (load_dataset("digits", split_seed=s) for s in (0, 0, 1))
        np.testing.assert_allclose(_class_shares(a.train_labels, 10), _class_shares(a.test_labels, 10), atol=0.01)
        torch.testing.assert_close(a.test.tensors[0], b.test.tensors[0])
        np.testing.assert_array_equal(a.test_labels, b.test_labels)
        assert not torch.equal(a.test.tensors[0], c.test.tensors[0])

    def test_standardised_with_training_statistics(self):
        x = load_dataset("digits").train.tensors[0]
        assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2

    def test_old_classes_and_subset(self):
        d = load_dataset("digits", old_classes="0-2,7", test_size=0.3)
        assert d.old_classes == (0, 1, 2, 7)
        assert len(d.test_labels) == pytest.approx(0.3 * 1797, abs=1)
        labels = {int(d.train[i][1]) for i in d.train_subset().indices}
        assert labels == {0, 1, 2, 7}
        assert len(d.train_subset(range(10))) == len(d.train_labels)


class TestSynthetic:
    def test_shapes_split_and_seed(self):
        a = load_dataset("synthetic", num_classes=6, dim=5, n_per_class=20)
        b = load_dataset("synthetic", num_classes=6, dim=5, n_per_class=20)
        assert a.num_classes == 6 and a.old_classes == (0, 1, 2) and a.input_shape == (5,)
        assert len(a.train_labels) == len(a.test_labels) == 60
        np.testing.assert_array_equal(np.bincount(a.test_labels), [10] * 6)  # stratified
        torch.testing.assert_close(a.train.tensors[0], b.train.tensors[0])
        c = load_dataset("synthetic", num_classes=6, dim=5, n_per_class=20, split_seed=1)
        assert not torch.equal(a.train.tensors[0], c.train.tensors[0])

    def test_info_identifies_the_data(self):
        # The checkpoint cache key is built from ``info``: every argument that changes the items
        # must be in it, or models trained on other data would be loaded from the cache.
        infos = [load_dataset("synthetic", n_per_class=10, **kw).info
                 for kw in ({}, {"split_seed": 1}, {"test_size": 0.3}, {"num_classes": 4})]
        assert len({repr(sorted(i.items())) for i in infos}) == len(infos)

    def test_make_synthetic(self):
        x, y = make_synthetic(num_classes=3, dim=4, n_per_class=5, seed=2)
        assert x.shape == (15, 4) and x.dtype == np.float32
        np.testing.assert_array_equal(y, np.repeat(np.arange(3), 5))
        np.testing.assert_array_equal(x, make_synthetic(3, 4, 5, seed=2)[0])
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            make_synthetic(dim=0)
        with pytest.raises(ValueError, match="num_classes must be at least 2"):
            make_synthetic(num_classes=1)

    def test_old_classes_parsed(self):
        assert load_dataset("synthetic", old_classes="1,3", n_per_class=10).old_classes == (1, 3)
        with pytest.raises(ValueError, match="old_classes 0-12 out of range"):
            load_dataset("synthetic", old_classes="0-12", n_per_class=10)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of: digits, fashion_mnist, synthetic"):
        load_dataset("mnist")


def test_data_root(monkeypatch, tmp_path):
    assert data_root(tmp_path) == tmp_path
    monkeypatch.setenv("BACKFILL_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("BACKFILL_DATA")
    assert data_root() == Path.home() / ".cache" / "backfill_lib" / "data"


class TestCifar100:
    @pytest.fixture
    def fake(self, tmp_path, monkeypatch):
        written = write_fake_cifar100(tmp_path, n_train=120, n_test=40)
        # torchvision checks the md5 sums of the real archive's files; our fake files cannot
        # match them. Both checks (the dataset's own and the one on the meta file) are bypassed
        # here, and only here: everything else is torchvision's real reading code.
        monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
        return tmp_path, written

    def test_fake_files_have_the_real_layout(self, fake):
        root, _ = fake
        with open(root / "cifar-100-python" / "train", "rb") as f:
            as_bytes = pickle.load(f, encoding="bytes")  # how the CIFAR web page reads it
        assert {b"data", b"fine_labels", b"coarse_labels"} <= set(as_bytes)
        assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (120, 3072)
        with open(root / "cifar-100-python" / "meta", "rb") as f:
            assert len(pickle.load(f, encoding="bytes")[b"fine_label_names"]) == 100

    def test_train_plain_is_the_unaugmented_train_split(self, fake):
        root, written = fake
        d = load_dataset("cifar100", root=root, download=False)
        raw = torch.as_tensor(written["train"]["data"][5].reshape(3, 32, 32), dtype=torch.float32) / 255
        mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
        torch.testing.assert_close(d.train_plain[5][0], (raw - mean[:, None, None]) / std[:, None, None],
                                   atol=1e-5, rtol=1e-5)

    def test_load(self, fake):
        root, written = fake
        d = load_dataset("cifar100", root=root, download=False)
        assert d.name == "cifar100" and d.num_classes == 100 and d.input_shape == (3, 32, 32)
        assert d.old_classes == tuple(range(50))
        np.testing.assert_array_equal(d.train_labels, written["train"]["fine_labels"])
        np.testing.assert_array_equal(d.test_labels, written["test"]["fine_labels"])
        assert len(d.train) == len(d.train_plain) == 120 and len(d.test) == 40
        x, y = d.test[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == written["test"]["fine_labels"][3]
        # Pixels are read channel-first as stored, then normalised.
        raw = torch.as_tensor(written["test"]["data"][3].reshape(3, 32, 32), dtype=torch.float32) / 255
        mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
        torch.testing.assert_close(x, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-5, rtol=1e-5)
        assert d.train.classes[0] == "class_0"

    def test_augmentation_only_on_train(self, fake):
        root, _ = fake
        d = load_dataset("cifar100", root=root, download=False, old_classes="0-9")
        assert d.old_classes == tuple(range(10))
        torch.manual_seed(0)
        for split in (d.train_plain, d.test):
            assert torch.equal(split[0][0], split[0][0])
        draws = [d.train[0][0] for _ in range(8)]
        assert all(x.shape == (3, 32, 32) for x in draws)
        assert any(not torch.equal(draws[0], x) for x in draws[1:])  # random crop / flip

    def test_missing_data_without_network(self, tmp_path, monkeypatch):
        def no_network(*args, **kwargs):
            raise urllib.error.URLError("no network in tests")

        monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
        with pytest.raises(DataNotFoundError, match=r"CIFAR100 is not under .* could not be downloaded") as info:
            load_dataset("cifar100", root=tmp_path, download=True)
        message = str(info.value)
        assert "URLError" in message and "download=True" in message and "BACKFILL_DATA" in message
        assert str(tmp_path) in message
        with pytest.raises(DataNotFoundError, match="copy the extracted data into"):
            load_dataset("cifar100", root=tmp_path, download=False)
        assert isinstance(info.value, FileNotFoundError)  # callers may catch the built-in


def _write_tree(root, classes=("cat", "dog", "fox"), per_class=5, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


class TestImageFolder:
    def test_single_tree_is_split(self, tmp_path):
        _write_tree(tmp_path, per_class=5)
        d = load_dataset("imagefolder", root=tmp_path, image_size=16, test_size=0.4)
        assert d.num_classes == 3 and d.old_classes == (0,) and d.input_shape == (3, 16, 16)
        assert len(d.train_labels) == 9 and len(d.test_labels) == 6
        np.testing.assert_array_equal(np.bincount(d.test_labels), [2, 2, 2])
        assert d.info["classes"] == ["cat", "dog", "fox"]
        x, y = d.test[0]
        assert x.shape == (3, 16, 16) and y == d.test_labels[0]
        assert [int(d.train[i][1]) for i in range(len(d.train))] == d.train_labels.tolist()
        assert torch.equal(d.train_plain[0][0], d.train_plain[0][0])
        torch.manual_seed(0)
        assert any(not torch.equal(d.train[0][0], d.train[0][0]) for _ in range(5))
        again = load_dataset("imagefolder", root=tmp_path, image_size=16, test_size=0.4)
        np.testing.assert_array_equal(again.test_labels, d.test_labels)
        assert [again.test.indices, again.train.indices] == [d.test.indices, d.train.indices]

    def test_train_test_folders(self, tmp_path):
        _write_tree(tmp_path / "train", per_class=4)
        _write_tree(tmp_path / "val", per_class=2, seed=1)
        d = load_dataset("imagefolder", root=tmp_path, image_size=8, old_classes="0-1")
        assert len(d.train_labels) == 12 and len(d.test_labels) == 6 and d.old_classes == (0, 1)
        assert d.input_shape == (3, 8, 8) and d.test[0][0].shape == (3, 8, 8)
        np.testing.assert_array_equal(d.test_labels, [0, 0, 1, 1, 2, 2])

    def test_info_includes_image_size(self, tmp_path):
        _write_tree(tmp_path, per_class=5)
        a = load_dataset("imagefolder", root=tmp_path, image_size=16, test_size=0.4).info
        b = load_dataset("imagefolder", root=tmp_path, image_size=8, test_size=0.4).info
        assert a != b

    def test_fingerprint_tells_trees_with_the_same_classes_apart(self, tmp_path):
        # same class names, same counts, same sizes: only the pixels differ
        _write_tree(tmp_path / "a", per_class=5, seed=0)
        _write_tree(tmp_path / "b", per_class=5, seed=1)
        a = load_dataset("imagefolder", root=tmp_path / "a", image_size=8, test_size=0.4).info
        b = load_dataset("imagefolder", root=tmp_path / "b", image_size=8, test_size=0.4).info
        assert a["classes"] == b["classes"] and a["n_test"] == b["n_test"]
        assert a["files"]["files"] == 15 and a["files"] != b["files"]
        without_root = lambda info: {k: v for k, v in info.items() if k != "root"}  # noqa: E731
        assert without_root(a) != without_root(b)

    def test_fingerprint_survives_a_move_and_sees_a_changed_file(self, tmp_path):
        import os
        import shutil

        _write_tree(tmp_path / "a", per_class=3)
        before = load_dataset("imagefolder", root=tmp_path / "a", image_size=8, test_size=0.34).info
        shutil.copytree(tmp_path / "a", tmp_path / "moved")  # copy2 keeps sizes and modification times
        moved = load_dataset("imagefolder", root=tmp_path / "moved", image_size=8, test_size=0.34).info
        assert moved["files"] == before["files"] and moved["root"] != before["root"]
        st = os.stat(tmp_path / "moved" / "dog" / "1.png")
        os.utime(tmp_path / "moved" / "dog" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        touched = load_dataset("imagefolder", root=tmp_path / "moved", image_size=8, test_size=0.34).info
        assert touched["files"] != before["files"]

    def test_fingerprint_of_train_test_folders_covers_both(self, tmp_path):
        _write_tree(tmp_path / "train", per_class=2)
        _write_tree(tmp_path / "test", per_class=2, seed=1)
        first = load_dataset("imagefolder", root=tmp_path, image_size=8).info["files"]
        Image.new("RGB", (12, 12)).save(tmp_path / "test" / "cat" / "0.png")  # another test image
        assert first["files"] == 12 and load_dataset("imagefolder", root=tmp_path, image_size=8).info["files"] != first

    def test_file_fingerprint(self, tmp_path):
        (tmp_path / "x").write_bytes(b"12")
        (tmp_path / "y").write_bytes(b"123")
        fp = file_fingerprint([tmp_path / "y", tmp_path / "x"], tmp_path)
        assert fp == file_fingerprint([tmp_path / "x", tmp_path / "y"], tmp_path)  # order-free
        assert fp["files"] == 2 and len(fp["sha256"]) == 20
        (tmp_path / "x").write_bytes(b"1234")
        assert file_fingerprint([tmp_path / "x", tmp_path / "y"], tmp_path) != fp
        with pytest.raises(ValueError, match="is not under root"):
            file_fingerprint([tmp_path / "x"], tmp_path / "elsewhere")

    def test_bad_input(self, tmp_path):
        with pytest.raises(ValueError, match="imagefolder needs root"):
            load_dataset("imagefolder")
        with pytest.raises(DataNotFoundError, match="is not a folder"):
            load_dataset("imagefolder", root=tmp_path / "missing")
        _write_tree(tmp_path / "train", classes=("a", "b"), per_class=2)
        _write_tree(tmp_path / "test", classes=("a", "c"), per_class=2)
        with pytest.raises(ValueError, match="root: test/ and train/ must have the same class folders"):
            load_dataset("imagefolder", root=tmp_path)
