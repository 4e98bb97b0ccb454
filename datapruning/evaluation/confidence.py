"""How sure eval is: 95% intervals from seeds plus a paired bootstrap, and the recommendation.

The recommendation is the smallest fraction whose lower bound stays within the tolerance of full data; it says
"beats random" only when the intervals separate."""
from __future__ import annotations

import numpy as np
import pandas as pd

LEVEL = 0.95
N_BOOT = 1000


class Bootstrap:
    """One set of ``n_boot`` seeded resamples of the held-out rows, shared by every curve (so differences
    between curves, and against the full data, are paired)."""

    def __init__(self, n_test: int, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL):
        rng = np.random.default_rng([int(seed), 1234])
        self.counts = rng.multinomial(n_test, np.full(n_test, 1.0 / n_test), size=n_boot).astype(np.float32)
        self.n, self.level = n_test, level

    def draws(self, correct: np.ndarray) -> np.ndarray:
        """Accuracy per resample; ``correct`` [seeds, n_test]: resample b uses seed ``b % seeds``, so the
        spread holds both the seeds' and the held-out rows' variation."""
        correct = np.atleast_2d(np.asarray(correct, np.float32))
        s = np.arange(len(self.counts)) % len(correct)
        return np.einsum("bn,bn->b", self.counts, correct[s]) / self.n

    def interval(self, draws: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(draws, [(1 - self.level) / 2, (1 + self.level) / 2])
        return float(lo), float(hi)


def cell_stats(boot: Bootstrap, correct: np.ndarray, full_correct: np.ndarray,
               full_draws: np.ndarray | None = None) -> dict:
    """accuracy (mean over seeds), its seed std, and the intervals of the accuracy and of its difference to the
    full-data probe (``full_draws``: ``boot.draws(full_correct)`` when the caller has it already)."""
    correct = np.atleast_2d(correct)
    per_seed = correct.mean(axis=1)
    draws = boot.draws(correct)
    lo, hi = boot.interval(draws)
    dlo, dhi = boot.interval(draws - (boot.draws(full_correct) if full_draws is None else full_draws))
    return {"accuracy": float(per_seed.mean()), "accuracy_std": float(per_seed.std()), "acc_lo": lo, "acc_hi": hi,
            "diff_lo": dlo, "diff_hi": dhi}


TEACHERS = {"probe": "the probe fitted on every training row of the sample",
            "cached": "the logits cached in RUN/teacher by 'datapruning teacher'"}
CELL_KEYS = ("acc_lo", "acc_hi", "diff_lo", "diff_hi")


def _best(table: pd.DataFrame, full_accuracy: float, tolerance: float, order: dict):
    """The best curve (by mean accuracy, ties: the earlier curve) at the smallest fraction below 1 where some
    curve's lower bound stays within ``tolerance`` of the full data; None when no curve does."""
    low = table["diff_lo"] if "diff_lo" in table else table["accuracy"] - full_accuracy
    ok = table[(table["fraction"] < 1.0) & (low >= -tolerance - 1e-12)]
    return None if ok.empty else _top(ok[ok["fraction"] == ok["fraction"].min()], order)


def _top(rows: pd.DataFrame, order: dict):
    ranked = rows.assign(order=rows["variant"].map(order)).sort_values(["accuracy", "order"], ascending=[False, True])
    return None if ranked.empty else ranked.iloc[0]


def _recipe(row) -> dict:
    """One cell as the summary records it: curve, fraction, mean accuracy and its intervals."""
    out = {"variant": str(row["variant"]), "fraction": float(row["fraction"]), "accuracy": float(row["accuracy"])}
    return out | {key: float(row[key]) for key in CELL_KEYS if key in row}


def recommend(table: pd.DataFrame, full_accuracy: float, tolerance: float, teacher: str = "probe") -> dict:
    """The smallest fraction below 1 at which some curve's lower bound stays within ``tolerance`` of the full data
    (``diff_lo >= -tolerance``, the paired interval; the mean accuracy where a table has no intervals), the best
    curve there by mean accuracy (ties: the earlier curve), whether it beats random there (intervals apart),
    and random (+kd) at that fraction. When KD curves were evaluated it also names, each with its interval, the
    best recipe with KD (``with_kd``, with the full-data teacher it presumes: ``teacher`` is the eval's
    --teacher) and the best without (``without_kd``, and the best without KD at the KD recipe's fraction)."""
    order = {name: i for i, name in enumerate(dict.fromkeys(table["variant"]))}
    kd = table["kd"].astype(bool) if "kd" in table else table["variant"].str.endswith("+kd")
    rec = {"full_accuracy": full_accuracy, "tolerance": tolerance, "fraction": 1.0, "variant": None,
           "criterion": f"lower end of the {LEVEL:.0%} interval of (accuracy - full-data accuracy) >= -tolerance"}
    sides = ""
    if kd.any():
        distilled, plain = _best(table[kd], full_accuracy, tolerance, order), _best(table[~kd], full_accuracy,
                                                                                     tolerance, order)
        presumes = f"a teacher trained on all the data (in this eval: {TEACHERS.get(teacher, teacher)})"
        rec["with_kd"] = {**(_recipe(distilled) if distilled is not None else {"variant": None, "fraction": 1.0}),
                          "teacher": presumes}
        rec["without_kd"] = _recipe(plain) if plain is not None else {"variant": None, "fraction": 1.0}
        sides = f"; with KD, which needs {presumes}: {_side(distilled, tolerance)}; without KD: {_side(plain, tolerance)}"
        if distilled is not None and (plain is None or plain["fraction"] != distilled["fraction"]):
            at = _top(table[~kd & (table["fraction"] == distilled["fraction"])], order)
            if at is not None:
                rec["without_kd"]["at_kd_fraction"] = _recipe(at)
                sides += f" (the best without KD at {distilled['fraction']:.0%}: {at['variant']} {_cell(at)})"
    best = _best(table, full_accuracy, tolerance, order)
    if best is None:
        rec["line"] = (f"recommendation: keep all the data: no curve's lower bound stays within {tolerance:.3f} of "
                       f"the full-data accuracy {full_accuracy:.3f} below fraction 1.0{sides}")
        return rec
    frac = float(best["fraction"])
    rec.update(_recipe(best))
    versus = ""
    for name in ("random", "random+kd"):
        rnd = table[(table["variant"] == name) & (table["fraction"] == frac)]
        if rnd.empty:
            continue
        r = rnd.iloc[0]
        rec[f"{name}_accuracy"] = float(r["accuracy"])
        versus += f"; {name} at {frac:.0%}: {_cell(r)}"
        if name == "random" and "acc_lo" in best:
            rec["beats_random"] = bool(best["acc_lo"] > r["acc_hi"]) and best["variant"] != "random"
    verdict = ""
    if "beats_random" in rec and rec["variant"] != "random":
        verdict = ("; beats random (intervals apart)" if rec["beats_random"]
                   else "; not distinguishable from random (intervals overlap)")
    rec["line"] = (f"recommendation: keep {frac:.0%} with {best['variant']}: probe accuracy {_cell(best)} vs "
                   f"{full_accuracy:.3f} on all training rows (tolerance {tolerance:.3f} on the lower bound)"
                   f"{verdict}{versus}{sides}")
    return rec


def _side(row, tolerance: float) -> str:
    if row is None:
        return f"keep all the data (no curve's lower bound within {tolerance:.3f} below 1.0)"
    return f"keep {row['fraction']:.0%} with {row['variant']}, {_cell(row)}"


def _cell(row) -> str:
    if "acc_lo" in row and not np.isnan(row["acc_lo"]):
        return f"{row['accuracy']:.3f} [{row['acc_lo']:.3f}, {row['acc_hi']:.3f}]"
    return f"{row['accuracy']:.3f}"
