"""Selection: scores -> keep flags, as pure rules on arrays and as typed selectors for the select stage.

The pure rules (``select_top``, ``select_with_minimums``, ...) work on numpy arrays; ``SELECTORS`` holds the
typed rules the select stage runs, shard by shard, from a config.
"""
from __future__ import annotations

from ..metrics.ranking import (MODES, balanced_quotas, class_balanced_quotas, group_minimums, keep_by_quota,
                               keep_count, order_key, rank_order, select_class_balanced, select_top,
                               select_with_minimums)
from .selectors import SELECTORS, SelectInputs, Selector

select_rank, select_balanced, select_dbp, select_ccs, select_groups = (
    SELECTORS[k] for k in ("rank", "balanced", "dbp", "ccs", "groups"))

__all__ = [
    "SELECTORS", "SelectInputs", "Selector", "MODES", "keep_count", "order_key", "rank_order", "select_top",
    "group_minimums", "keep_by_quota", "select_with_minimums", "class_balanced_quotas", "balanced_quotas",
    "select_class_balanced", "select_rank", "select_balanced", "select_dbp", "select_ccs", "select_groups",
]
