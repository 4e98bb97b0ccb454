"""Pruning-curve plots: accuracy vs keep fraction, one line per curve with its 95% interval as a band."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..io.files import atomic_path


def plot_curves(table: pd.DataFrame, rec: dict, path: Path, title: str = "") -> None:
    """Accuracy vs keep fraction, one line per curve with its 95% band; full data dashed.
    Left: every curve; right: zoomed on the band near the full-data accuracy."""
    from ..errors import require

    fig = require("matplotlib.figure", "report", "eval's curves").Figure(figsize=(12, 5), dpi=100, layout="constrained")
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
    with atomic_path(path) as tmp:  # a killed savefig leaves no half-written PNG under the real name
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")


def _band(ax, part: pd.DataFrame, x, colour: str, alpha: float) -> None:
    if "acc_lo" in part:
        ax.fill_between(x, part["acc_lo"].to_numpy(), part["acc_hi"].to_numpy(), color=colour, alpha=alpha, lw=0)
    elif part["seeds"].iloc[0] > 1:
        y, sd = part["accuracy"].to_numpy(), part["accuracy_std"].to_numpy()
        ax.fill_between(x, y - sd, y + sd, color=colour, alpha=alpha, lw=0)


def _draw_curves(ax, table: pd.DataFrame, rec: dict) -> None:
    """One line per curve with its 95% interval as a band (seeds + bootstrap over the held-out rows)."""
    colours: dict[str, str] = {}
    for name, part in table.groupby("variant", sort=False):
        part = part.sort_values("fraction")
        x, y = part["fraction"].to_numpy(), part["accuracy"].to_numpy()
        metric, mode = part["metric"].iloc[0], str(part["mode"].iloc[0])
        kd = bool(part["kd"].iloc[0]) if "kd" in part else False
        if metric == "random" and mode == "random" and part["selector"].iloc[0] == "rank":
            colour = "C3" if kd else "0.35"
            _band(ax, part, x, colour, 0.25)
            ax.plot(x, y, "-." if kd else "-", color=colour, lw=2, marker="o", ms=3, label=f"{name} (95% band)")
        elif mode.startswith("config"):  # wide and faint underneath, so a curve it equals stays visible
            ax.plot(x, y, "-", color="k", lw=6, alpha=0.18, zorder=1, label=name)
        else:
            colour = colours.setdefault(metric, f"C{len(colours) % 10}")
            style = "-." if kd else "--" if mode.endswith("easy") else ":" if mode in ("ccs", "groups") else "-"
            _band(ax, part, x, colour, 0.08)
            ax.plot(x, y, style, color=colour, marker="o", ms=3, label=name, zorder=3)
    full, tol = rec["full_accuracy"], rec["tolerance"]
    ax.axhline(full, color="k", lw=0.8, ls="--")
    ax.axhspan(full - tol, full, color="green", alpha=0.08, label=f"within {tol:.3f} of full data")
    if rec.get("variant"):
        ax.plot([rec["fraction"]], [rec["accuracy"]], marker="*", ms=16, color="gold", mec="k", zorder=5,
                label=f"recommended: {rec['variant']} @ {rec['fraction']:.0%}", ls="none")
