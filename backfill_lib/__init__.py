"""backfill_lib: online backfilling for embedding-model upgrades in image retrieval.

The shared library of the book *Online Backfilling* (after Seo et al., WACV 2025). One module per
concept: :mod:`~backfill_lib.data`, :mod:`~backfill_lib.models`, :mod:`~backfill_lib.training`,
:mod:`~backfill_lib.retrieval`, :mod:`~backfill_lib.metrics`, :mod:`~backfill_lib.backfill`,
:mod:`~backfill_lib.strategies`, :mod:`~backfill_lib.plots`, :mod:`~backfill_lib.widgets` and the
experiment command :mod:`~backfill_lib.experiment`.
"""

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
    old_only,
    rank_merge,
    reverse_transform,
    simulate_backfill,
)
from .data import BackfillData, DataNotFoundError, load_dataset, parse_classes  # noqa: E402
from .metrics import (  # noqa: E402
    auc,
    average_precision,
    mean_average_precision,
    negative_flip_rate,
    relative_gain,
    same_label,
    topk_hits,
)
from .models import EmbeddingModel, ModelSpec, build_model  # noqa: E402
from .retrieval import Gallery, MixedGallery, merge_topk, score_matrix, search  # noqa: E402
from .training import TrainConfig, cache_key, default_device, extract_embeddings, train, train_or_load  # noqa: E402
