"""Metric registry: name -> pipeline adapter. A new metric is one file plus one line here."""
from __future__ import annotations

from .base import MetricFn, MetricOutput, ScoreInputs
from .ccs import ccs_allocate, ccs_default_beta, ccs_select, select_ccs
from .dbp import (complexity, d_inter, d_intra, dbp_quotas, dbp_shares, project_capped_simplex, score_dbp,
                  select_dbp)
from .dp4tl import (feature_mapping_assign, feature_mapping_freq, label_mapping_freq, lm_predictions_from_logits,
                    read_embeddings, score_dp4tl_fm, score_dp4tl_lm, select_groups, top_k_groups,
                    train_linear_source_classifier, zero_shot_predictions)
from .el2n import el2n, el2n_proxy, score_el2n
from .random import random_scores, score_random
from .semdedup import eps_for_keep_fraction, score_semdedup, semdedup_filter, semdedup_masks, semdedup_scores
from .ssp import class_prototypes, prototypicality, score_ssp
from ..select import Selector, select_balanced, select_rank

METRICS: dict[str, MetricFn] = {
    "ssp": score_ssp,
    "random": score_random,
    "semdedup": score_semdedup,
    "dbp": score_dbp,
    "dp4tl_lm": score_dp4tl_lm,
    "dp4tl_fm": score_dp4tl_fm,
    "el2n": score_el2n,
}

# Selectors: name -> (SelectInputs, n_keep, **params from config select.params) -> (keep, info)
SELECTORS: dict[str, Selector] = {
    "rank": select_rank,
    "balanced": select_balanced,
    "dbp": select_dbp,
    "ccs": select_ccs,
    "groups": select_groups,
}

__all__ = [
    "METRICS", "SELECTORS", "MetricOutput", "ScoreInputs",
    "prototypicality", "class_prototypes", "random_scores",
    "semdedup_scores", "semdedup_masks", "semdedup_filter", "eps_for_keep_fraction",
    "d_intra", "d_inter", "complexity", "dbp_shares", "dbp_quotas", "project_capped_simplex", "select_dbp",
    "lm_predictions_from_logits", "train_linear_source_classifier", "zero_shot_predictions", "label_mapping_freq",
    "top_k_groups", "feature_mapping_assign", "feature_mapping_freq", "read_embeddings", "select_groups",
    "el2n", "el2n_proxy", "ccs_select", "ccs_default_beta", "ccs_allocate", "select_ccs",
]
