"""Selection: scores -> keep flags, as typed selectors over a run's rows and as functions on numpy arrays.

``SELECTORS`` holds the rules the select stage runs shard by shard from a config; the array functions
(``select_top``, ``select_with_minimums``, ``ccs_select``, ...) run the same code on rows in memory.
"""
from __future__ import annotations

from ..metrics.ranking import MODES, balanced_quotas, keep_count, order_key, rank_order
from .arrays import (ccs_select, class_balanced_quotas, keep_by_quota, select_class_balanced, select_top,
                     select_with_minimums)
from .selectors import SELECTORS, SelectInputs, Selector

select_rank, select_balanced, select_dbp, select_ccs, select_groups = (
    SELECTORS[k] for k in ("rank", "balanced", "dbp", "ccs", "groups"))

__all__ = [
    "SELECTORS", "SelectInputs", "Selector", "MODES", "keep_count", "order_key", "rank_order", "select_top",
    "keep_by_quota", "select_with_minimums", "class_balanced_quotas", "balanced_quotas", "select_class_balanced",
    "ccs_select", "select_rank", "select_balanced", "select_dbp", "select_ccs", "select_groups",
]
