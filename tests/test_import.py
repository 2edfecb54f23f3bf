"""``import backfill_lib`` must stay light: no torch (issue 10: it cost 2.2 s and 660 MB)."""

import subprocess
import sys

import pytest

import backfill_lib

# Every name exported at the top level before the exports became lazy, plus the new ones.
EXPORTED_BEFORE = [
    "DEFAULT_RATIOS", "BackfillCurve", "Strategy", "backfill_order", "backfilled_mask", "compatible_single_space",
    "evaluate_backfill", "forward_transform", "offline_backfill", "old_only", "rank_merge", "reverse_transform",
    "simulate_backfill", "BackfillData", "DataNotFoundError", "load_dataset", "parse_classes", "auc",
    "average_precision", "mean_average_precision", "negative_flip_rate", "relative_gain", "same_label",
    "topk_hits", "EmbeddingModel", "ModelSpec", "build_model", "Gallery", "MixedGallery", "merge_topk",
    "score_matrix", "search", "TrainConfig", "cache_key", "default_device", "extract_embeddings", "train",
    "train_or_load",
]
NEW = {"ReverseTransform": "transforms", "ForwardTransform": "transforms", "OnlineBackfillIndex": "live_index",
       "register_transform": "transforms"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("modules", [
    "backfill_lib, backfill_lib.metrics, backfill_lib.backfill, backfill_lib.retrieval, backfill_lib.evaluation",
    "backfill_lib.validation",
    "backfill_lib.strategies",  # torch-free since commit 7a11b28
])
def test_light_modules_do_not_import_torch(modules):
    out = _run(f"import {modules}; import sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert out.returncode == 0, out.stderr


def test_evaluating_a_curve_does_not_import_torch():
    code = ("import numpy as np, sys, backfill_lib as bl\n"
            "x = np.eye(6, dtype='float32')\n"
            "c = bl.evaluate_backfill(bl.rank_merge(x, x), [0, 0, 1, 1, 2, 2])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", EXPORTED_BEFORE + list(NEW))
def test_every_export_is_importable_and_listed(name):
    assert name in backfill_lib.__all__ and name in dir(backfill_lib)
    module = NEW.get(name)
    if module is not None:
        mod = pytest.importorskip(f"backfill_lib.{module}")
        if not hasattr(mod, name):
            pytest.skip(f"backfill_lib.{module} has no {name} yet")
    assert getattr(backfill_lib, name) is not None


def test_lazy_name_is_the_module_object():
    from backfill_lib import MixedGallery
    from backfill_lib.retrieval import MixedGallery as direct
    assert MixedGallery is direct


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        backfill_lib.nothing_here  # noqa: B018
