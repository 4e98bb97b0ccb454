"""Selection: scores -> keep flags. The pure rules (``select_top``, ``select_with_minimums``, ...) work on
numpy arrays; ``SELECTORS`` holds the rules the select stage runs from a config."""
from __future__ import annotations

from ..metrics.ranking import (MODES, class_balanced_quotas, group_minimums, keep_by_quota, keep_count, rank_order,
                               select_class_balanced, select_top, select_with_minimums)
from .selectors import (SelectInputs, Selector, metric_scores, select_balanced, select_ccs, select_dbp,
                        select_groups, select_rank)

# name -> (SelectInputs, n_keep, **params from config select.params) -> (keep, info)
SELECTORS: dict[str, Selector] = {
    "rank": select_rank,
    "balanced": select_balanced,
    "dbp": select_dbp,
    "ccs": select_ccs,
    "groups": select_groups,
}

__all__ = [
    "SELECTORS", "SelectInputs", "Selector", "MODES", "metric_scores", "keep_count", "rank_order", "select_top",
    "group_minimums", "keep_by_quota", "select_with_minimums", "class_balanced_quotas", "select_class_balanced",
    "select_rank", "select_balanced", "select_dbp", "select_ccs", "select_groups",
]
