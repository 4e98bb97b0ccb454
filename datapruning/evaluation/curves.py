"""Pruning-curve evaluation: a linear probe on the kept training rows, per metric, mode and keep fraction."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import StageError
from ..io.files import write_json, write_parquet
from ..run import load_run_config
from ..select import SelectInputs, keep_count
from .data import EvalData, load_eval_data
from .plots import plot_curves
from .probe import probe_accuracy, stratified_split

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


@dataclass(frozen=True)
class Variant:
    """One pruning curve: a registered selector with its parameters; ``seeds`` > 1 repeats it (random)."""

    name: str
    metric: str
    mode: str
    selector: str
    params: dict = field(default_factory=dict)
    seeds: int = 1


def default_variants(metrics, select_cfg=None, seeds: int = 5) -> list[Variant]:
    """Curves for the metrics a run scored: rank hard/easy by every score (ssp, el2n, yours), DBP
    hard/easy, CCS on el2n, SemDeDup (drop the most duplicated first), DP4TL whole groups, random
    over ``seeds`` seeds, and the run's own select config."""
    method = getattr(select_cfg, "method", None)
    own = dict(getattr(select_cfg, "params", {}) or {})
    out: list[Variant] = []

    def params_for(selector: str, **fixed):  # the run's select.params apply to its own selector only
        extra = {k: v for k, v in own.items() if k not in fixed and k != "keep_fraction_groups"}
        return {**(extra if method == selector else {}), **fixed}

    for m in metrics:
        if m == "random":
            continue
        if m == "semdedup":
            out.append(Variant("semdedup", m, "easy", "rank", {"metric": m, "mode": "easy"}))
        elif m == "dbp":
            continue  # added below with the dbp selector
        elif m in ("dp4tl_lm", "dp4tl_fm"):
            by = "label" if m == "dp4tl_lm" else "cluster"
            out.append(Variant(m, m, "groups", "groups", params_for("groups", metric=m, by=by)))
        else:
            out += [Variant(f"{m}/{mode}", m, mode, "rank", {"metric": m, "mode": mode}) for mode in ("hard", "easy")]
            if m == "el2n":
                out.append(Variant("el2n/ccs", m, "ccs", "ccs", params_for("ccs", metric=m)))
    if "dbp" in metrics or method == "dbp":
        out += [Variant(f"dbp/{mode}", "dbp", mode, "dbp", params_for("dbp", mode=mode)) for mode in ("hard", "easy")]
    out.append(Variant("random", "random", "random", "rank", {"metric": "random", "mode": "hard"}, seeds=seeds))
    if select_cfg is not None:
        out.append(run_config_variant(select_cfg))
    return out


def run_config_variant(select_cfg) -> Variant:
    """The run's own selection (method, metric, mode, minimum shares, params) as one curve."""
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
    return Variant(f"config: {select_cfg.method} {metric} {mode}", str(metric), f"config:{mode}",
                   select_cfg.method, params)


def select_train(data: EvalData, variant: Variant, fraction: float, seed: int) -> np.ndarray:
    """Keep mask over the TRAINING rows, made by the package's registered selector (never re-implemented)."""
    from ..metrics import random_scores
    from ..select import SELECTORS

    train = ~data.test
    scores = {m: s[train] for m, s in data.scores.items()}
    if variant.metric == "random" and variant.selector == "rank":
        scores["random"] = random_scores(data.uid[train], seed)
    inp = SelectInputs(uid=data.uid[train], cluster=data.cluster[train], cos_dist=data.cos_dist[train],
                       centroids=data.centroids, scores=scores, seed=seed,
                       labels=None if data.select_labels is None else data.select_labels[train])
    n = keep_count(int(train.sum()), fraction, None)
    keep, _ = SELECTORS[variant.selector](inp, n, **variant.params)
    return np.asarray(keep, dtype=bool)


def evaluate_curves(data: EvalData, variants, fractions=DEFAULT_FRACTIONS, max_iter: int = 200,
                    C: float = 1.0, bar=None) -> tuple[pd.DataFrame, float]:
    """(table, full-data accuracy). One row per variant x fraction: kept rows, accuracy (mean over
    seeds) and its std; NaN where the selector refused that fraction. A probe is fit once per distinct
    kept set (cached by content)."""
    train_idx = np.flatnonzero(~data.test)
    x_test, y_test = data.embeddings[data.test], data.labels[data.test]
    cache: dict[str, float] = {}

    def accuracy(keep: np.ndarray) -> float:
        rows = train_idx[keep]
        key = hashlib.blake2b(rows.tobytes(), digest_size=20).hexdigest()
        if key not in cache:
            cache[key] = probe_accuracy(data.embeddings[rows], data.labels[rows], x_test, y_test, max_iter, C)
        return cache[key]

    full = accuracy(np.ones(len(train_idx), dtype=bool))
    rows = []
    for v in variants:
        for f in fractions:
            accs, kept = [], []
            for s in range(v.seeds):
                try:
                    keep = select_train(data, v, float(f), data.seed + s)
                except ValueError as exc:  # e.g. a config's CCS beta leaves too few rows: an empty cell, not a crash
                    log.warning("eval: %s at fraction %g: %s", v.name, f, exc)
                    keep = None
                accs.append(np.nan if keep is None else accuracy(keep))
                kept.append(0 if keep is None else int(keep.sum()))
                if bar is not None:
                    bar.update(1)
            rows.append({"variant": v.name, "metric": v.metric, "mode": v.mode, "selector": v.selector,
                         "fraction": float(f), "kept": float(np.mean(kept)), "accuracy": float(np.mean(accs)),
                         "accuracy_std": float(np.std(accs)), "seeds": v.seeds})
    return pd.DataFrame(rows), full


def recommend(table: pd.DataFrame, full_accuracy: float, tolerance: float) -> dict:
    """The smallest fraction below 1 at which some curve's (mean) accuracy is within ``tolerance`` of the
    full data, and the best curve there (ties: the earlier curve in the table); with random's accuracy there."""
    target = full_accuracy - tolerance
    ok = table[(table["fraction"] < 1.0) & (table["accuracy"] >= target - 1e-12)]
    rec = {"full_accuracy": full_accuracy, "tolerance": tolerance, "fraction": 1.0, "variant": None}
    if ok.empty:
        rec["line"] = (f"recommendation: keep all the data: no curve stays within {tolerance:.3f} of the full-data "
                       f"accuracy {full_accuracy:.3f} below fraction 1.0")
        return rec
    frac = float(ok["fraction"].min())
    order = {name: i for i, name in enumerate(dict.fromkeys(table["variant"]))}
    at = ok[ok["fraction"] == frac]
    best = at.assign(order=at["variant"].map(order)).sort_values(["accuracy", "order"], ascending=[False, True]).iloc[0]
    rec.update(fraction=frac, variant=str(best["variant"]), accuracy=float(best["accuracy"]))
    rnd = table[(table["variant"] == "random") & (table["fraction"] == frac)]
    versus = ""
    if not rnd.empty:
        rec["random_accuracy"] = float(rnd["accuracy"].iloc[0])
        versus = f"; random at {frac:.0%}: {rnd['accuracy'].iloc[0]:.3f} ± {rnd['accuracy_std'].iloc[0]:.3f}"
    rec["line"] = (f"recommendation: keep {frac:.0%} with {best['variant']}: probe accuracy {best['accuracy']:.3f} "
                   f"vs {full_accuracy:.3f} on all training rows (tolerance {tolerance:.3f}){versus}")
    return rec


def accuracy_grid(table: pd.DataFrame) -> pd.DataFrame:
    """variant x fraction grid of accuracy strings, curves in table order; repeated curves show mean±std."""
    cell = table.apply(lambda r: "n/a" if np.isnan(r["accuracy"]) else f"{r['accuracy']:.3f}"
                       + (f"±{r['accuracy_std']:.3f}" if r["seeds"] > 1 else ""), axis=1)
    grid = table.assign(cell=cell).pivot(index="variant", columns="fraction", values="cell")
    grid = grid.loc[list(dict.fromkeys(table["variant"]))]
    grid.columns = [f"{c:g}" for c in grid.columns]
    return grid


def format_table(table: pd.DataFrame) -> str:
    """The accuracy grid as printable text."""
    return accuracy_grid(table).to_string()


def run_eval(run_dir, label_column: str = "label", fractions=DEFAULT_FRACTIONS, seeds: int = 5,
             tolerance: float = 0.01, test_split: str | None = None, test_fraction: float = 0.2,
             max_iter: int = 200) -> dict:
    """Evaluate every curve of a run and write RUN/eval/{curves.parquet, curves.png, summary.json}."""
    from tqdm.auto import tqdm

    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"eval: fractions must be in (0, 1], got {fractions}")
    if seeds < 1 or tolerance < 0:
        raise ValueError(f"eval: need --seeds >= 1 and --tolerance >= 0, got {seeds} and {tolerance}")
    run_dir = Path(run_dir)
    data = load_eval_data(run_dir, label_column, test_split, test_fraction)
    cfg = load_run_config(run_dir)
    variants = default_variants(sorted(data.scores), cfg.select, seeds)
    log.info("eval: %d labelled rows (%s); %d curves x %d fractions", len(data.uid), data.split_source,
             len(variants), len(fractions))
    with tqdm(total=sum(v.seeds for v in variants) * len(fractions), desc="eval", unit="probe",
              disable=None, dynamic_ncols=True) as bar:
        table, full = evaluate_curves(data, variants, fractions, max_iter=max_iter, bar=bar)
    rec = recommend(table, full, tolerance)
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    write_parquet(out / "curves.parquet", pa.Table.from_pandas(table, preserve_index=False))
    plot_curves(table, rec, out / "curves.png", f"pruning curves: {run_dir.resolve().parent.name}/{run_dir.name} "
                f"({(~data.test).sum()} training rows, {data.test.sum()} held out)")
    summary = {**rec, "label_column": label_column, "split": data.split_source, "fractions": fractions,
               "seeds": seeds, "train_rows": int((~data.test).sum()), "test_rows": int(data.test.sum()),
               "probe": {"model": "LogisticRegression(lbfgs)", "max_iter": max_iter, "C": 1.0,
                         "features": "standardised embeddings"},
               "curves": [asdict(v) for v in variants]}
    write_json(out / "summary.json", summary)
    return {"table": table, "summary": summary, "dir": out}


__all__ = ["DEFAULT_FRACTIONS", "Variant", "EvalData", "stratified_split", "probe_accuracy", "default_variants",
           "select_train", "evaluate_curves", "recommend", "accuracy_grid", "format_table", "plot_curves",
           "load_eval_data", "run_eval"]
