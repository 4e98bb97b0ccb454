"""The recipes eval compares, named e.g. ``semdedup→dbp/hard+kd``, and the keep mask each one makes.

A recipe is a registered selector with its parameters, optionally after SemDeDup, class-balanced, or distilled."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, StageError
from ..select import SelectInputs, keep_count

DEDUP_KEEP = 0.9  # composed recipes: SemDeDup first keeps this share of the training rows (never below the budget)
RANDOMISED_MODES = ("random", "ccs")


@dataclass(frozen=True)
class Variant:
    """One pruning curve: a registered selector with its parameters. ``dedup``: SemDeDup first, keeping that
    share of the training rows; ``kd``: the probe distils from the full-data teacher; ``seeds``: repeats."""

    name: str
    metric: str
    mode: str
    selector: str
    params: dict = field(default_factory=dict)
    seeds: int = 1
    dedup: float | None = None
    kd: bool = False

    def with_kd(self) -> "Variant":
        return dataclasses.replace(self, name=f"{self.name}+kd", kd=True)

    @property
    def base(self) -> str:
        """The name without ``+kd``: the selection the curve makes."""
        return self.name[:-3] if self.kd else self.name


def _rank(metric: str, mode: str, seeds: int, prefix: str = "", dedup=None) -> Variant:
    return Variant(f"{prefix}{metric}/{mode}", metric, mode, "rank", {"metric": metric, "mode": mode},
                   seeds if mode in RANDOMISED_MODES else 1, dedup)


def default_variants(metrics, select_cfg=None, seeds: int = 3, has_labels: bool = True) -> list[Variant]:
    """Curves for the metrics a run scored: every score ranked hard and easy, CCS over every per-row score,
    DBP hard/easy, SemDeDup alone and composed before DBP and CCS, class-balanced variants (with labels),
    DP4TL whole groups, random (all randomised ones over ``seeds`` seeds), and the run's own select config."""
    method = getattr(select_cfg, "method", None)
    own = dict(getattr(select_cfg, "params", {}) or {})
    out: list[Variant] = []

    def params_for(selector: str, **fixed):  # the run's select.params apply to its own selector only
        extra = {k: v for k, v in own.items() if k not in fixed and k != "keep_fraction_groups"}
        return {**(extra if method == selector else {}), **fixed}

    ranked = [m for m in metrics if m not in ("random", "semdedup", "dbp", "dp4tl_lm", "dp4tl_fm")]
    for m in ranked:
        out += [_rank(m, "hard", seeds), _rank(m, "easy", seeds)]
        out.append(Variant(f"{m}/ccs", m, "ccs", "ccs", params_for("ccs", metric=m), seeds))
        if has_labels:
            out.append(Variant(f"{m}/hard+balanced", m, "hard", "balanced", {"metric": m, "mode": "hard",
                                                                             "by": "label"}))
    if "semdedup" in metrics:
        out.append(Variant("semdedup", "semdedup", "easy", "rank", {"metric": "semdedup", "mode": "easy"}))
    for m in metrics:
        if m in ("dp4tl_lm", "dp4tl_fm"):
            by = "label" if m == "dp4tl_lm" else "cluster"
            out.append(Variant(m, m, "groups", "groups", params_for("groups", metric=m, by=by)))
    if "dbp" in metrics or method == "dbp":
        out += [Variant(f"dbp/{mode}", "dbp", mode, "dbp", params_for("dbp", mode=mode)) for mode in ("hard", "easy")]
        if "semdedup" in metrics:
            out.append(Variant("semdedup→dbp/hard", "dbp", "hard", "dbp", params_for("dbp", mode="hard"),
                               dedup=DEDUP_KEEP))
    if "semdedup" in metrics and "el2n" in metrics:
        out.append(Variant("semdedup→el2n/ccs", "el2n", "ccs", "ccs", params_for("ccs", metric="el2n"), seeds,
                           DEDUP_KEEP))
    out.append(Variant("random", "random", "random", "rank", {"metric": "random", "mode": "hard"}, seeds=seeds))
    if has_labels:
        out.append(Variant("random+balanced", "random", "random", "balanced",
                           {"metric": "random", "mode": "hard", "by": "label"}, seeds=seeds))
    if select_cfg is not None:
        out.append(run_config_variant(select_cfg, seeds))
    return out


def run_config_variant(select_cfg, seeds: int = 1) -> Variant:
    """The run's own selection (method, metric, mode, minimum shares, params, SemDeDup filter) as one curve."""
    from ..select import SELECTORS
    from ..select.stage import COMMON

    if select_cfg.method not in SELECTORS:
        raise StageError(f"select.method: unknown selector {select_cfg.method!r}; known: {sorted(SELECTORS)}")
    selector = SELECTORS[select_cfg.method]
    params = {k: getattr(select_cfg, k) for k in COMMON if k in selector.common and getattr(select_cfg, k) is not None}
    params.update({k: v for k, v in select_cfg.params.items() if k != "keep_fraction_groups"})
    typed = selector.parse({k: v for k, v in params.items() if k not in COMMON},
                           {k: v for k, v in params.items() if k in COMMON})
    metric, mode = getattr(typed, "metric", "cos_dist"), getattr(typed, "mode", "-")
    randomised = select_cfg.method == "ccs" or mode == "random" or metric == "random"
    return Variant(f"config: {select_cfg.method} {metric} {mode}", str(metric), f"config:{mode}",
                   select_cfg.method, params, seeds if randomised else 1, select_cfg.dedup_keep_fraction)


def pick_variants(variants: list[Variant], names: str | None) -> list[Variant]:
    """The curves named in a comma-separated list (a ``+kd`` suffix adds the KD twin); None keeps every curve."""
    if not names:
        return variants
    by_name = {v.name: v for v in variants}
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        base = name[:-3] if name.endswith("+kd") else name
        if base not in by_name:
            raise StageError(f"eval: --curves names {base!r}; this run offers {sorted(by_name)}")
        out.append(by_name[base].with_kd() if name.endswith("+kd") else by_name[base])
    return out


def dedup_eligible(score: np.ndarray, share: float) -> np.ndarray:
    """Rows SemDeDup keeps when tuned to keep ``share`` of them (the select stage's own filter)."""
    from ..metrics.semdedup import semdedup_filter

    return semdedup_filter(score, keep_fraction=float(share))[0]


def select_train(data, variant: Variant, fraction: float, seed: int) -> np.ndarray:
    """Keep mask over the TRAINING rows, made by the package's registered selector (never re-implemented)."""
    from ..metrics import random_scores
    from ..select import SELECTORS

    train = ~data.test
    scores = {m: s[train] for m, s in data.scores.items()}
    if variant.metric == "random" or variant.params.get("metric") == "random":
        scores["random"] = random_scores(data.uid[train], seed)
    n = keep_count(int(train.sum()), fraction, None)
    eligible = None
    if variant.dedup is not None:
        if "semdedup" not in scores:
            raise InputError("a SemDeDup-first recipe needs the semdedup metric")
        eligible = dedup_eligible(scores["semdedup"], max(float(variant.dedup), fraction))
        n = min(n, int(eligible.sum()))
    inp = SelectInputs(uid=data.uid[train], cluster=data.cluster[train], cos_dist=data.cos_dist[train],
                       centroids=data.centroids, scores=scores, seed=seed, eligible=eligible,
                       labels=None if data.select_labels is None else data.select_labels[train])
    keep, _ = SELECTORS[variant.selector](inp, n, **variant.params)
    return np.asarray(keep, dtype=bool)
