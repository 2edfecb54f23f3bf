"""backfill_lib: online backfilling for embedding-model upgrades in image retrieval.

The shared library of the book *Online Backfilling* (after Seo et al., WACV 2025). One module per
concept: :mod:`~backfill_lib.data`, :mod:`~backfill_lib.models`, :mod:`~backfill_lib.training`,
:mod:`~backfill_lib.retrieval`, :mod:`~backfill_lib.metrics`, :mod:`~backfill_lib.backfill`,
:mod:`~backfill_lib.evaluation`, :mod:`~backfill_lib.strategies`, :mod:`~backfill_lib.transforms`,
:mod:`~backfill_lib.live_index`, :mod:`~backfill_lib.plots`, :mod:`~backfill_lib.widgets` and the
experiment command :mod:`~backfill_lib.experiment`.

``import backfill_lib`` loads numpy only: the evaluation names (metrics, strategies' vectors,
backfill curves) are imported at once, and every other name is imported from its module on first
use (PEP 562), so torch, faiss and torchvision are loaded only by code that needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .backfill import (  # noqa: E402
    DEFAULT_RATIOS,
    BackfillCurve,
    Strategy,
    backfill_order,
    backfilled_mask,
    compatible_single_space,
    evaluate_backfill,
    forward_transform,
    offline_backfill,
    new_query_on_stored,
    old_only,
    rank_merge,
    reverse_transform,
    same_model,
    simulate_backfill,
)
from .metrics import (  # noqa: E402
    auc,
    average_precision,
    mean_average_precision,
    negative_flip_rate,
    relative_gain,
    same_label,
    topk_hits,
)

#: Names exported from modules that load torch or faiss, imported on first access.
_LAZY = {
    "BackfillData": "data", "DataNotFoundError": "data", "load_dataset": "data", "parse_classes": "data",
    "EmbeddingModel": "models", "ModelSpec": "models", "build_model": "models",
    "Gallery": "retrieval", "MixedGallery": "retrieval", "merge_topk": "retrieval", "score_matrix": "retrieval",
    "search": "retrieval",
    "TrainConfig": "training", "cache_key": "training", "default_device": "training",
    "extract_embeddings": "training", "train": "training", "train_or_load": "training",
    "ReverseTransform": "transforms", "ForwardTransform": "transforms", "register_transform": "transforms",
    "OnlineBackfillIndex": "live_index",
}

__all__ = sorted(
    ["DEFAULT_RATIOS", "BackfillCurve", "Strategy", "backfill_order", "backfilled_mask", "compatible_single_space",
     "evaluate_backfill", "forward_transform", "new_query_on_stored", "offline_backfill", "old_only", "rank_merge",
     "reverse_transform", "same_model", "simulate_backfill", "auc", "average_precision", "mean_average_precision", "negative_flip_rate",
     "relative_gain", "same_label", "topk_hits", *_LAZY]
)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'backfill_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
