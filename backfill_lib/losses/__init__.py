"""Training objectives of METHOD §3, one short module each.

* :mod:`.bct` — BCT influence loss through the frozen old classifier (§3.2).
* :mod:`.bct_pseudo` — BCT's open-class variant (openBCT, BT²): a pseudo-classifier of old-feature
  class means over all classes, influence loss on every sample (§3.2).
* :mod:`.ra_bct` — RA-BCT / Hot-Refresh InfoNCE towards the old feature (§3.3).
* :mod:`.reverse` — ``L_rt``, the reverse transformation's regression loss (§3.4).
* :mod:`.metric_compatible` — ``L_mc``, one softmax over old- and new-stored items (§3.5).
* :mod:`.multi_compatible` — ``L_mc`` over K stored sets (several upgrades in a row).

Each function takes embeddings and labels and returns a scalar; the closures that plug a loss
into :func:`backfill_lib.training.train` live next to it.
"""

from .bct import bct_influence_loss, bct_objective
from .bct_pseudo import bct_pseudo_influence_loss, bct_pseudo_objective, pseudo_classifier
from .metric_compatible import NEGATIVES, metric_compatible_loss
from .multi_compatible import multi_compatible_loss
from .ra_bct import ra_bct_loss, ra_bct_objective
from .reverse import regression_loss, reverse_loss

__all__ = ["NEGATIVES", "bct_influence_loss", "bct_objective", "bct_pseudo_influence_loss", "bct_pseudo_objective",
           "metric_compatible_loss", "multi_compatible_loss", "pseudo_classifier", "ra_bct_loss", "ra_bct_objective",
           "regression_loss", "reverse_loss"]
