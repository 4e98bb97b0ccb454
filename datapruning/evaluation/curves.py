"""Pruning-curve evaluation: a converged probe per recipe and keep fraction, with and without KD, with intervals.

Writes the curves, the recommendation and ``recommended.yaml``."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..io.files import atomic_dir, write_json, write_parquet
from ..run import RunLayout, load_run_config, locked
from .confidence import N_BOOT, Bootstrap, cell_stats, recommend
from .data import DEFAULT_MAX_ROWS, EvalData, load_eval_data
from .fits import CurveFitter
from .kd import KDSettings
from .plots import plot_curves
from .probe import ProbeSettings, stratified_split
from .recipes import Variant, default_variants, pick_variants, select_train
from .recommended import write_recommended
from ..errors import ConfigError, StageError

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
KD_MODES = ("auto", "all", "none")
KD_CANDIDATES = 2  # kd=auto: KD twins of random and of the best this many curves


def evaluate_curves(data: EvalData, variants, fractions=DEFAULT_FRACTIONS, probe: ProbeSettings | None = None,
                    kd: KDSettings | None = None, bar=None, fitter: CurveFitter | None = None,
                    n_boot: int | None = None) -> tuple[pd.DataFrame, float]:
    """(table, full-data accuracy). One row per curve x fraction: kept rows, accuracy (mean over seeds), its
    seed std, the interval of the accuracy and of its paired difference to the full-data probe; NaN where the
    selector refused that fraction. Every selection is made first, then the distinct fits run as one batch."""
    probe = probe or ProbeSettings(seed=data.seed)
    own = fitter is None
    fitter = fitter or CurveFitter(data, probe, kd or KDSettings())
    try:
        n_train = len(fitter.train)
        cells, jobs = [], [(np.ones(n_train, bool), 0.0)]  # the full-data fit first: the others compare to it
        for v in variants:
            for f in fractions:
                kept = []
                for s in range(v.seeds):
                    try:
                        keep = select_train(data, v, float(f), data.seed + s)
                    except ValueError as exc:  # e.g. a config's CCS beta leaves too few rows: an empty cell
                        log.warning("eval: %s at fraction %g: %s", v.name, f, exc)
                        if bar is not None:
                            bar.update(1)
                        continue
                    alpha = fitter.kd.alpha_for(keep.sum() / max(n_train, 1)) if v.kd else 0.0
                    kept.append((keep, alpha))
                cells.append((v, float(f), kept))
                jobs += kept
        if bar is not None:
            bar.total += 1  # the full-data fit
        fitter.fit_many(jobs, None if bar is None else bar.update)
        n_test = len(fitter.y_test)
        boot = Bootstrap(n_test, n_boot or max(200, min(N_BOOT, int(4e7 // max(n_test, 1)))), data.seed)
        rows, full_draws = [], boot.draws(fitter.full)
        for v, f, kept in cells:
            correct = [fitter.correct(keep, alpha) for keep, alpha in kept]
            stats = (cell_stats(boot, np.array(correct), fitter.full, full_draws) if correct else dict.fromkeys(
                ("accuracy", "accuracy_std", "acc_lo", "acc_hi", "diff_lo", "diff_hi"), np.nan))
            rows.append({"variant": v.name, "metric": v.metric, "mode": v.mode, "selector": v.selector,
                         "kd": v.kd, "fraction": f, "kept": float(np.mean([k.sum() for k, _ in kept])) if kept
                         else 0.0, **stats, "seeds": v.seeds})
        return pd.DataFrame(rows), float(fitter.full.mean())
    finally:
        if own:
            fitter.close()


def kd_candidates(table: pd.DataFrame, variants: list[Variant], n: int = KD_CANDIDATES) -> list[Variant]:
    """KD twins for random and the ``n`` curves with the best mean accuracy below fraction 1."""
    part = table[(table["fraction"] < 1.0) & ~table["kd"]]
    mean = part.groupby("variant", sort=False)["accuracy"].mean().drop("random", errors="ignore").dropna()
    names = ["random", *mean.sort_values(ascending=False, kind="stable").index[:n]]
    by_name = {v.name: v for v in variants}
    return [by_name[name].with_kd() for name in names if name in by_name]


def accuracy_grid(table: pd.DataFrame) -> pd.DataFrame:
    """variant x fraction grid of accuracy strings, curves in table order, with the interval where known."""
    def cell(r) -> str:
        if np.isnan(r["accuracy"]):
            return "n/a"
        if "acc_lo" in r and not np.isnan(r["acc_lo"]):
            return f"{r['accuracy']:.3f} [{r['acc_lo']:.3f},{r['acc_hi']:.3f}]"
        return f"{r['accuracy']:.3f}" + (f"±{r['accuracy_std']:.3f}" if r["seeds"] > 1 else "")

    grid = table.assign(cell=table.apply(cell, axis=1)).pivot(index="variant", columns="fraction", values="cell")
    grid = grid.loc[list(dict.fromkeys(table["variant"]))]
    grid.columns = [f"{c:g}" for c in grid.columns]
    return grid


def format_table(table: pd.DataFrame) -> str:
    """The accuracy grid as printable text."""
    return accuracy_grid(table).to_string()


def run_eval(run_dir, label_column: str = "label", fractions=DEFAULT_FRACTIONS, seeds: int = 3,
             tolerance: float = 0.01, test_split: str | None = None, test_fraction: float = 0.2,
             max_rows: int | None = DEFAULT_MAX_ROWS, kd: str = "auto", kd_settings: KDSettings | None = None,
             probe: ProbeSettings | None = None, curves: str | None = None, workers: int = 0) -> dict:
    """Evaluate the curves of a run and write RUN/eval/{curves.parquet, curves.png, summary.json,
    recommended.yaml}. ``kd``: auto (KD twins of random and the best curves), all, or none. ``workers``:
    processes for the probe fits (0: auto, 2 at most, none below 5,000 training rows); results do not
    depend on it."""
    start = time.perf_counter()
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ConfigError(f"eval: fractions must be in (0, 1], got {fractions}")
    for flag, value, ok, want in (("--seeds", seeds, seeds >= 1, ">= 1"), ("--kd", kd, kd in KD_MODES, KD_MODES),
                                  ("--tolerance", tolerance, 0.0 <= tolerance < 1.0, "in [0, 1)"),  # NaN: False
                                  ("--test-fraction", test_fraction, 0.0 < test_fraction < 1.0, "in (0, 1)"),
                                  ("--max-rows", max_rows, max_rows is None or max_rows >= 4, "0 (all) or >= 4"),
                                  ("--workers", workers, workers >= 0, ">= 0 (0: auto)")):
        if not ok:
            raise ConfigError(f"eval: {flag} must be {want}, got {value!r}")
    layout = RunLayout(run_dir)
    with locked(layout.root):  # one writer: a run changing the folder meanwhile would leave curves of another config
        return _run_eval(layout, label_column, fractions, seeds, tolerance, test_split, test_fraction, max_rows, kd,
                         kd_settings, probe, curves, workers, start)


def _run_eval(layout: RunLayout, label_column, fractions, seeds, tolerance, test_split, test_fraction, max_rows, kd,
              kd_settings, probe, curves, workers, start) -> dict:
    from tqdm.auto import tqdm

    run_dir = layout.root
    data = load_eval_data(run_dir, label_column, test_split, test_fraction, max_rows)
    check_meaningful(data, label_column)
    cfg = load_run_config(run_dir)
    variants = pick_variants(default_variants(sorted(data.scores), cfg.select, seeds,
                                              data.select_labels is not None), curves)
    if kd == "all":
        variants = variants + [v.with_kd() for v in variants if not v.kd]
    probe = probe or ProbeSettings(seed=data.seed)
    kd_settings = kd_settings or KDSettings()
    log.info("eval: %d of %d labelled rows sampled (%s); %d curves x %d fractions", len(data.uid),
             data.labelled_rows, data.split_source, len(variants), len(fractions))
    with CurveFitter(data, probe, kd_settings, run_dir, workers) as fitter, tqdm(
            total=sum(v.seeds for v in variants) * len(fractions), desc="eval", unit="probe", disable=None,
            dynamic_ncols=True) as bar:
        table, full = evaluate_curves(data, variants, fractions, probe, kd_settings, bar, fitter)
        if kd == "auto":
            extra = [v for v in kd_candidates(table, variants) if v.name not in set(table["variant"])]
            bar.total += sum(v.seeds for v in extra) * len(fractions)
            more, _ = evaluate_curves(data, extra, fractions, probe, kd_settings, bar, fitter)
            table = pd.concat([table, more], ignore_index=True)
            variants = variants + extra
    rec = recommend(table, full, tolerance, kd_settings.teacher)
    out = layout.eval
    with atomic_dir(out) as tmp:  # every file of eval/ from this run, or none (a killed rerun leaves the old set)
        summary = write_outputs(tmp, layout, data, table, rec, variants, kd_settings, {
            "label_column": label_column, "split": data.split_source, "fractions": fractions, "seeds": seeds,
            "probe": probe.as_dict(), "kd": {"mode": kd, **kd_settings.as_dict()}, "fit_workers": fitter.workers},
            max_rows, start)
    return {"table": table, "summary": summary, "dir": out}


def check_meaningful(data: EvalData, label_column: str) -> None:
    """Refuse an eval whose accuracy would mean nothing: one class only (every probe scores 1.0), or held-out
    rows whose classes never occur in training (every probe scores 0 on them); warn when only some do."""
    train, test = set(np.unique(data.labels[~data.test]).tolist()), np.unique(data.labels[data.test]).tolist()
    if len(train | set(test)) < 2:
        raise StageError(f"eval: column {label_column!r} holds a single class among the labelled rows; a probe's "
                         "accuracy is 1.0 by construction, so pruning curves would say nothing: eval needs 2+ classes")
    unseen = [c for c in test if c not in train]
    if len(unseen) == len(test):
        raise StageError(f"eval: none of the {len(test)} classes of the held-out rows ({data.split_source}) occurs in "
                         "the training rows; accuracy would be 0 by construction; hold out rows of the trained classes")
    if unseen:
        log.warning("eval: %d of %d held-out classes never occur in the training rows; their %d rows count as "
                    "errors for every curve", len(unseen), len(test),
                    int(np.isin(data.labels[data.test], unseen).sum()))


def write_outputs(tmp: Path, layout: RunLayout, data: EvalData, table: pd.DataFrame, rec: dict, variants,
                  kd_settings: KDSettings, settings: dict, max_rows, start: float) -> dict:
    """Write curves.parquet, curves.png, recommended.yaml and summary.json into ``tmp`` (to become
    ``layout.eval``)."""
    run_dir = layout.root
    sample = {"rows": int(len(data.uid)), "labelled_rows": data.labelled_rows, "max_rows": max_rows,
              "train_rows": int((~data.test).sum()), "test_rows": int(data.test.sum()),
              "how": "seeded, label-stratified (by the uid tie hash), in uid-hash order"}
    table["sample_rows"] = sample["rows"]
    write_parquet(tmp / layout.curves.name, pa.Table.from_pandas(table, preserve_index=False))
    plot_curves(table, rec, tmp / layout.curves_png.name, f"pruning curves: {run_dir.parent.name}/{run_dir.name} "
                f"({sample['train_rows']} training rows, {sample['test_rows']} held out; sample of "
                f"{sample['rows']} of {data.labelled_rows} labelled rows)")
    by_name = {v.name: v for v in variants}
    recipe = write_recommended(run_dir, tmp / layout.recommended.name, by_name, rec, kd_settings,
                               shown=layout.recommended)
    summary = {**rec, **settings, "sample": sample, "train_rows": sample["train_rows"],
               "test_rows": sample["test_rows"],
               "confidence": {"level": 0.95, "bootstrap": "paired, over the held-out rows; resample b uses seed "
                              "b mod seeds"},
               "recommended": recipe, "wall_s": round(time.perf_counter() - start, 1),
               "curves": [asdict(v) for v in variants]}
    write_json(tmp / layout.eval_summary.name, summary)
    return summary


__all__ = ["DEFAULT_FRACTIONS", "Variant", "EvalData", "stratified_split", "default_variants", "select_train",
           "evaluate_curves", "recommend", "accuracy_grid", "format_table", "plot_curves", "load_eval_data",
           "run_eval", "CurveFitter", "kd_candidates"]
