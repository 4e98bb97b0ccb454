"""Pruning-curve evaluation: a linear probe on the kept training rows, per metric, mode and keep fraction."""
from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StageError
from ..io.files import is_done, write_json, write_parquet
from ..run import Run, label_codes, load_columns, load_run_arrays, load_run_config, load_scores
from ..select import SelectInputs, keep_count

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
TEST_SPLITS = ("test", "val", "valid", "validation", "heldout", "held_out", "holdout", "eval")


@dataclass(frozen=True)
class Variant:
    """One pruning curve: a registered selector with its parameters; ``seeds`` > 1 repeats it (random)."""

    name: str
    metric: str
    mode: str
    selector: str
    params: dict = field(default_factory=dict)
    seeds: int = 1


@dataclass(frozen=True)
class EvalData:
    """Labelled rows of a run, aligned by row. ``labels`` are the probe's target codes; ``select_labels``
    are the run's own label codes that selectors see (None without labels); ``test`` is never pruned."""

    uid: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    test: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    scores: dict
    select_labels: np.ndarray | None = None
    seed: int = 0
    split_source: str = ""


# ---------------------------------------------------------------- pure numeric parts
def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified hold-out: ``round(test_fraction * n_c)`` rows of every class c with at least
    two rows go to the test side (so every such class keeps a training row). Returns the test mask."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"eval: test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(round(test_fraction * len(rows))), len(rows) - 1)
        test[rows[:max(n_test, 0)]] = True
    return test


def probe_accuracy(x_train, y_train, x_test, y_test, max_iter: int = 200, C: float = 1.0) -> float:
    """Multinomial logistic regression (lbfgs, fixed ``max_iter``: deterministic) on standardised
    features; accuracy on the test rows. One training class predicts that class; none scores 0."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y_test = np.asarray(y_test)
    classes = np.unique(y_train)
    if len(classes) == 0 or len(y_test) == 0:
        return 0.0
    if len(classes) == 1:
        return float(np.mean(y_test == classes[0]))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fixed budget on purpose: same fit every time
        clf.fit((x_train - mean) / std, y_train)
    return float(np.mean(clf.predict((x_test - mean) / std) == y_test))


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
    accepted = inspect.signature(SELECTORS[select_cfg.method]).parameters
    params = {k: getattr(select_cfg, k) for k in COMMON if k in accepted}
    params.update({k: v for k, v in select_cfg.params.items() if k != "keep_fraction_groups"})
    metric, mode = params.get("metric", select_cfg.metric), params.get("mode", "-")
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
        key = hashlib.sha1(rows.tobytes()).hexdigest()
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


def plot_curves(table: pd.DataFrame, rec: dict, path: Path, title: str = "") -> None:
    """Accuracy vs keep fraction, one line per curve; random as mean ± std band; full data dashed.
    Left: every curve; right: zoomed on the band near the full-data accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    full, tol = rec["full_accuracy"], rec["tolerance"]
    for ax in axes:
        _draw_curves(ax, table, rec)
        ax.set(xlabel="keep fraction of the training rows", xlim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="linear-probe accuracy (held-out)", title="all curves")
    span = max(5 * tol, 0.05)
    axes[1].set(ylim=(full - span, min(1.0, full + span / 5) + 0.002), title=f"zoom: within {span:.2f} of full data")
    axes[0].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title or "pruning curves")
    fig.savefig(path)


def _draw_curves(ax, table: pd.DataFrame, rec: dict) -> None:
    colours: dict[str, str] = {}
    for name, part in table.groupby("variant", sort=False):
        part = part.sort_values("fraction")
        x, y = part["fraction"].to_numpy(), part["accuracy"].to_numpy()
        metric, mode = part["metric"].iloc[0], str(part["mode"].iloc[0])
        if name == "random":
            sd = part["accuracy_std"].to_numpy()
            ax.fill_between(x, y - sd, y + sd, color="0.6", alpha=0.3, lw=0)
            ax.plot(x, y, color="0.35", lw=2, marker="o", ms=3, label=f"random (mean ± std, {part['seeds'].iloc[0]} seeds)")
        elif mode.startswith("config"):  # wide and faint underneath, so a curve it equals stays visible
            ax.plot(x, y, "-", color="k", lw=6, alpha=0.18, zorder=1, label=name)
        else:
            style = "--" if mode.endswith("easy") else ":" if mode in ("ccs", "groups") else "-"
            ax.plot(x, y, style, color=colours.setdefault(metric, f"C{len(colours)}"), marker="o", ms=3, label=name,
                    zorder=3)
    full, tol = rec["full_accuracy"], rec["tolerance"]
    ax.axhline(full, color="k", lw=0.8, ls="--")
    ax.axhspan(full - tol, full, color="green", alpha=0.08, label=f"within {tol:.3f} of full data")
    if rec.get("variant"):
        ax.plot([rec["fraction"]], [rec["accuracy"]], marker="*", ms=16, color="gold", mec="k", zorder=5,
                label=f"recommended: {rec['variant']} @ {rec['fraction']:.0%}", ls="none")


# ---------------------------------------------------------------- run folder I/O
def _require_stages(run: Run, stages=("embed", "cluster", "score")) -> None:
    for stage in stages:
        for shard in run.shards:
            if not is_done(run.dir(stage), shard["name"]):
                raise StageError(f"eval: {run.dir(stage)} has no finished output for shard {shard['name']}; "
                                 f"run 'datapruning {stage} --output {run.output}' (or 'run') first")


def _shard_column(run: Run, name: str, uid: pa.Array, column: str) -> pa.Array | None:
    """``column`` for one shard from its embeddings parquet, else its manifest; None when neither has it."""
    for stage in ("embed", "manifest"):
        path = run.dir(stage) / f"{name}.parquet"
        if path.exists() and column in pq.read_schema(path).names:
            return load_columns(run, stage, name, uid, [column])[column].combine_chunks()
    return None


def load_eval_data(run_dir, label_column: str = "label", test_split: str | None = None,
                   test_fraction: float = 0.2) -> EvalData:
    """Embeddings, clusters, scores and labels of a run; rows without a label are left out."""
    run = Run(load_run_config(Path(run_dir)), Path(run_dir))
    _require_stages(run)
    arrays = load_run_arrays(run, with_embeddings=True)
    labels_raw, splits = [], []
    for name, lo, hi in arrays["bounds"]:
        uid = pa.array(arrays["uid"][lo:hi], pa.string())
        col = _shard_column(run, name, uid, label_column)
        if col is None:
            raise StageError(f"eval needs labels: no column {label_column!r} in {run.dir('embed') / name}.parquet "
                             "or its manifest; pass --label-column NAME")
        labels_raw.append(col)
        splits.append(_shard_column(run, name, uid, "split"))
    labels, _ = label_codes(labels_raw)
    if labels is None or (labels >= 0).sum() < 4:
        raise StageError(f"eval needs labels: column {label_column!r} of {run.output} has fewer than 4 labelled rows")
    rows = labels >= 0
    test, source = _heldout(splits, labels, rows, test_split, test_fraction, run.cfg.seed)
    scores = {m: s[rows] for m, s in load_scores(run, arrays).items()}
    if "el2n" in scores:
        scores["el2n"] = _el2n_without_heldout(run, arrays["embeddings"][rows], labels[rows], test, scores["el2n"])
    sel = arrays["labels"]
    return EvalData(uid=arrays["uid"][rows], embeddings=arrays["embeddings"][rows], labels=labels[rows], test=test,
                    cluster=arrays["cluster"][rows], cos_dist=arrays["cos_dist"][rows],
                    centroids=np.load(run.dir("cluster") / "centroids.npy", allow_pickle=False), scores=scores,
                    select_labels=None if sel is None else sel[rows], seed=run.cfg.seed, split_source=source)


def _el2n_without_heldout(run: Run, x: np.ndarray, labels: np.ndarray, test: np.ndarray, stored: np.ndarray):
    """The run's EL2N proxy heads saw every labelled row, held-out ones included; for the curves, retrain them
    on the training rows only (same parameters), so no held-out label shapes which rows count as hard.
    Scores from the user's own logits are kept as they are."""
    from ..metrics.el2n import el2n_proxy

    params = dict(run.cfg.score.params.get("el2n", {}))
    if params.get("logits"):
        return stored
    keys = ("n_models", "epochs", "hidden", "lr")
    out = np.full(len(labels), np.nan)
    out[~test] = el2n_proxy(x[~test], labels[~test], seed=params.get("seed", run.cfg.seed),
                            **{k: params[k] for k in keys if k in params})
    return out


def _heldout(splits, labels, rows, test_split, test_fraction, seed) -> tuple[np.ndarray, str]:
    """Test mask over the labelled rows: the split column when it names a test side, else stratified."""
    if all(s is not None for s in splits) and splits:
        values = np.asarray(pa.concat_arrays([s.cast(pa.string()) for s in splits]).to_pylist(), dtype=object)[rows]
        values = np.array([str(v).lower() for v in values])
        test = values == test_split.lower() if test_split else np.isin(values, TEST_SPLITS)
        if test.any() and (~test).any():
            return test, f"split column, held out: {', '.join(sorted(set(values[test])))}"
        if test_split:
            raise StageError(f"eval: --test-split {test_split!r} matches {int(test.sum())} of {len(test)} rows of "
                             f"the split column (values: {sorted(set(values))[:10]})")
    test = stratified_split(labels[rows], test_fraction, seed)
    return test, f"seeded stratified split, {test_fraction:.0%}, seed {seed}"


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
           "select_train", "evaluate_curves", "recommend", "accuracy_grid", "format_table", "plot_curves", "load_eval_data",
           "run_eval"]
