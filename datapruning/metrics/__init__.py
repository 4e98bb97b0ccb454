"""The published pruning methods as pure functions on numpy arrays (no file I/O, explicit seeds).

The formulas, defaults and their sources are in docs/methods.md. The pipeline runs them through
``datapruning.score.METRICS`` (scores); the keep rules (``select_top``, ``ccs_select``, ...) are in
``datapruning.select``, the same code the select stage runs.
"""
from __future__ import annotations

from .ccs import ccs_allocate, ccs_default_beta, ccs_strata
from .datacomp import caption_passes, clip_scores, contains_names, size_passes
from .dbp import complexity, d_inter, d_intra, dbp_quotas, dbp_shares, project_capped_simplex
from .dp4tl import (feature_mapping_assign, feature_mapping_freq, label_mapping_freq, lm_predictions_from_logits,
                    top_k_groups, train_linear_source_classifier, zero_shot_predictions)
from .el2n import el2n, el2n_proxy
from .random import random_scores
from .semdedup import eps_for_keep_fraction, semdedup_filter, semdedup_masks, semdedup_scores
from .ssp import class_prototypes, prototypicality

__all__ = [
    "prototypicality", "class_prototypes", "random_scores",
    "semdedup_scores", "semdedup_masks", "semdedup_filter", "eps_for_keep_fraction",
    "d_intra", "d_inter", "complexity", "dbp_shares", "dbp_quotas", "project_capped_simplex",
    "lm_predictions_from_logits", "train_linear_source_classifier", "zero_shot_predictions", "label_mapping_freq",
    "top_k_groups", "feature_mapping_assign", "feature_mapping_freq",
    "el2n", "el2n_proxy", "ccs_default_beta", "ccs_allocate", "ccs_strata",
    "clip_scores", "caption_passes", "size_passes", "contains_names",
]
