"""One self-contained HTML report of a run: clusters, DBP quotas, scores, kept shares, thumbnails, curves."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..errors import InputError, StageError
from ..io.files import is_done, read_json, write_bytes
from ..io.tables import label_sort_key
from ..run import Run, RunLayout, load_run_config, locked
from .curves import accuracy_grid

log = logging.getLogger(__name__)

N_CLUSTERS_SHOWN, N_MEMBERS_SHOWN, N_PAIRS_SHOWN, THUMB_PX = 6, 6, 6, 72
MAX_THUMB_PIXELS = 50_000_000  # below PIL's bomb limit (179M, a warning from 89M): a thumbnail never decodes more


# ---------------------------------------------------------------- plots (matplotlib, no pyplot state)
def _figure(w: float, h: float):
    from ..errors import require

    return require("matplotlib.figure", "report", "the report").Figure(figsize=(w, h), dpi=100, layout="constrained")


def png_uri(fig_or_bytes) -> str:
    """A matplotlib figure (or PNG bytes) as a ``data:image/png;base64`` URI."""
    if not isinstance(fig_or_bytes, bytes):
        buf = io.BytesIO()
        fig_or_bytes.savefig(buf, format="png")
        fig_or_bytes = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(fig_or_bytes).decode()


def plot_clusters(sizes: np.ndarray, kept: np.ndarray) -> str:
    """Cluster size histogram, and kept fraction against cluster size."""
    fig = _figure(10, 3.4)
    a, b = fig.subplots(1, 2)
    if len(sizes) <= 60:  # few clusters: every cluster as a bar, largest first, kept part overlaid
        order = np.argsort(-sizes, kind="stable")
        a.bar(range(len(sizes)), sizes[order], color="C0", alpha=0.45, label="size")
        a.bar(range(len(sizes)), kept[order], color="C2", label="kept")
        a.set_xticks(range(len(sizes)), order, fontsize=7)
        a.set(xlabel="cluster id (by size)", ylabel="samples", title=f"cluster sizes (k={len(sizes)})")
        a.legend(fontsize=8)
    else:
        a.hist(sizes, bins=50, color="C0")
        a.set(xlabel="cluster size (samples)", ylabel="clusters", title=f"cluster size distribution (k={len(sizes)})")
    frac = np.divide(kept, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
    b.scatter(sizes, frac, s=14, alpha=0.7, color="C2")
    b.set(xlabel="cluster size", ylabel="kept fraction", title="kept fraction per cluster", ylim=(-0.03, 1.03))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return png_uri(fig)


def plot_dbp(sizes, quotas, complexity, note: str) -> str:
    """DBP quota against cluster size, coloured by cluster complexity; the diagonal is the size cap."""
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    pts = ax.scatter(sizes, quotas, c=complexity, cmap="viridis", s=22)
    top = max(int(np.max(sizes, initial=1)), 1)
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="cap: quota = cluster size")
    fig.colorbar(pts, ax=ax, label="complexity C = d_inter * d_intra")
    ax.set(xlabel="cluster size M_j", ylabel="DBP quota n_j", title=f"DBP quota vs cluster size ({note})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png_uri(fig)


def plot_scores(df: pd.DataFrame, metrics: list[str]) -> str:
    """One histogram per metric: kept and dropped samples overlaid."""
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    keep = df["keep"].to_numpy(dtype=bool)
    for ax, m in zip(axes, metrics):
        s = df[f"score_{m}"].to_numpy(dtype=np.float64)
        ok = np.isfinite(s)
        bins = np.histogram_bin_edges(s[ok], bins=40) if ok.any() else 10
        ax.hist(s[ok & keep], bins=bins, alpha=0.65, color="C2", label="kept")
        ax.hist(s[ok & ~keep], bins=bins, alpha=0.55, color="C3", label="dropped")
        ax.set(title=f"score_{m}" + (f" ({int((~ok).sum())} NaN)" if (~ok).any() else ""), ylabel="samples")
        ax.legend(fontsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return png_uri(fig)


def plot_labels(labels: pd.Series, keep: np.ndarray) -> str:
    """Kept fraction per label (the 60 most frequent labels)."""
    table = pd.DataFrame({"label": labels.astype(str), "keep": keep}).groupby("label")["keep"].agg(["mean", "size"])
    table = table.sort_values("size", ascending=False).head(60).sort_index(
        key=lambda idx: [label_sort_key(v) for v in idx])
    fig = _figure(max(5.0, 0.28 * len(table) + 2), 3.4)
    ax = fig.subplots()
    ax.bar(range(len(table)), table["mean"], color="C1")
    ax.set_xticks(range(len(table)), [clip(v, 30) for v in table.index], rotation=90 if len(table) > 12 else 0,
                  fontsize=8)
    ax.axhline(float(keep.mean()), color="k", ls="--", lw=0.8, label=f"overall {keep.mean():.0%}")
    ax.set(ylabel="kept fraction", title="kept fraction per label", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return png_uri(fig)


# ---------------------------------------------------------------- data
def load_manifest(run: Run) -> pd.DataFrame:
    """The manifest of a finished run, in shard order."""
    for shard in run.shards:
        if not is_done(run.dir("manifest"), shard["name"]):
            raise StageError(f"report: {run.dir('manifest')} has no finished output for shard {shard['name']}; "
                             f"run 'datapruning run' or 'datapruning manifest --output {run.output}' first")
    return pd.concat([pq.read_table(run.layout.shard_file("manifest", s["name"])).to_pandas() for s in run.shards],
                     ignore_index=True)


def dbp_view(run: Run, df: pd.DataFrame, stats: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(sizes, quotas, complexity, note): from the select stage when it used DBP, else computed on the fly
    with the package's DBP functions for the run's kept count."""
    from ..metrics import complexity, d_inter, d_intra, dbp_quotas, dbp_shares

    sel = stats.get("select", {})
    if sel.get("method") == "dbp" and "quotas" in sel:
        return (np.asarray(sel["sizes"]), np.asarray(sel["quotas"]), np.asarray(sel["complexity"]),
                f"select used DBP, tau={sel.get('tau')}")
    params = run.cfg.select.params if run.cfg.select.method == "dbp" else {}
    tau, l = float(params.get("tau", 0.1)), int(params.get("l", 20))
    centroids = np.load(run.layout.centroids, allow_pickle=False)
    cluster, k = df["cluster"].to_numpy(np.int64), len(centroids)
    comp = complexity(d_intra(df["cos_dist"].to_numpy(), cluster, k), d_inter(centroids, l))
    sizes = np.bincount(cluster[cluster >= 0], minlength=k)
    quotas = dbp_quotas(int(df["keep"].sum()), dbp_shares(comp, tau), sizes)
    return sizes, quotas, comp, f"computed for N={int(df['keep'].sum())}, tau={tau}, l={l}"


def thumbnail_uri(data: bytes, px: int = THUMB_PX) -> str:
    """Image bytes -> a PNG data URI whose longer side is ``px`` (small images upscaled crisply). Bytes PIL
    cannot read, and images over ``MAX_THUMB_PIXELS`` (decompression bombs), raise ValueError."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_THUMB_PIXELS:
            raise InputError(f"{img.width}x{img.height} pixels is too large to decode for a thumbnail")
        img = img.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes (DecompressionBombError too)
        raise InputError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
    scale = px / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.NEAREST if scale > 1 else Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return png_uri(buf.getvalue())


def fetch_media(run: Run, wanted: set[str]) -> dict[str, dict]:
    """uid -> {"image": data URI or None, "text": str or None}: images read from the original tar shards by
    key (webdataset input), text from the embeddings' ``text`` column. Each needed shard is read once."""
    from ..io.webdataset import iter_tar_samples

    out = {uid: {"image": None, "text": None} for uid in wanted}
    image_keys = run.cfg.input.image_keys
    for shard in run.shards:
        name = shard["name"]
        emb = run.layout.shard_file("embed", name)
        if "text" in pq.read_schema(emb).names:
            t = pq.read_table(emb, columns=["uid", "text"]).to_pandas()
            for uid, text in zip(t["uid"], t["text"]):
                if uid in out and text:
                    out[uid]["text"] = str(text)
        keys = {uid.split("/", 1)[1] for uid in wanted if uid.startswith(name + "/")}
        if shard.get("format") != "webdataset" or not keys:
            continue
        for sample in iter_tar_samples(shard["path"], name, Counter()):
            if sample["__key__"] in keys:
                ext = next((e for e in image_keys if e in sample), None)
                if ext is not None:
                    try:
                        out[f"{name}/{sample['__key__']}"]["image"] = thumbnail_uri(sample[ext])
                    except (OSError, ValueError) as exc:
                        log.warning("report: shard %s, key %s: unreadable image (%s)", name, sample["__key__"], exc)
                keys.discard(sample["__key__"])
                if not keys:
                    break
    return out


def sample_clusters(sizes: np.ndarray, n: int = N_CLUSTERS_SHOWN) -> list[int]:
    """Up to ``n`` clusters with at least 2 members, spread evenly from the largest to the smallest."""
    ids = np.flatnonzero(sizes >= 2)
    ids = ids[np.argsort(-sizes[ids], kind="stable")]
    if len(ids) <= n:
        return ids.tolist()
    return ids[np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))].tolist()


def duplicate_pairs(run: Run, df: pd.DataFrame, n: int = N_PAIRS_SHOWN) -> list[tuple[int, int, float]]:
    """The ``n`` most duplicated rows by ``score_semdedup``, each with its most similar cluster-mate. Reads only
    the cluster groups those rows fall in (the cluster stage's partitions), never every embedding."""
    from ..cluster.parts import read_group
    from ..run import shard_offsets

    groups_path = run.layout.groups
    if not groups_path.exists():
        log.warning("report: no cluster partitions (cluster.partition=false); duplicate pairs left out")
        return []
    groups = np.load(groups_path, allow_pickle=False)
    offsets = np.array([off for _, off, _ in shard_offsets(run)], dtype=np.int64)
    cluster = df["cluster"].to_numpy(np.int64)
    top = np.argsort(-df["score_semdedup"].to_numpy(np.float64), kind="stable")[:n]
    loaded: dict[int, dict] = {}
    pairs = []
    for i in top:
        if cluster[i] < 0:
            continue
        g = int(groups[cluster[i]])
        part = loaded.setdefault(g, read_group(run, offsets, g))
        rows = np.flatnonzero(part["cluster"] == cluster[i])
        me = rows[part["pos"][rows] == i]
        mates = rows[part["pos"][rows] != i]
        if len(me) and len(mates):
            sims = part["embedding"][mates] @ part["embedding"][me[0]]
            pairs.append((int(i), int(part["pos"][mates[np.argmax(sims)]]), float(sims.max())))
    return pairs


# ---------------------------------------------------------------- HTML
CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1280px}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#f4f6f8;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:20px}.muted{color:#666;font-size:13px}img.plot{max-width:100%}
.strip{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 8px}.m{width:86px;font-size:11px;text-align:center}
.m img,.m .txt{border:3px solid #c33;border-radius:4px}.m.k img,.m.k .txt{border-color:#2a2}
.txt{height:66px;overflow:hidden;text-align:left;padding:2px;background:#fafafa}
.row{display:flex;flex-wrap:wrap;gap:0 40px}h3{margin:14px 0 4px;font-size:16px}
.pair{display:inline-flex;gap:4px;align-items:center;margin:0 18px 10px 0}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:480px}"""


def _esc(v) -> str:
    return html.escape(str(v))


def clip(text, n: int) -> str:
    """``text`` cut to ``n`` characters with an ellipsis (a 1 MB label is drawn as a tick otherwise)."""
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "…"


def member_html(df: pd.DataFrame, i: int, media: dict, note: str) -> str:
    row, med = df.iloc[i], media.get(df["uid"].iloc[i], {})
    label = f"label {clip(row['label'], 60)}" if "label" in df.columns else ""
    if med.get("image"):
        body = f'<img src="{med["image"]}" width="{THUMB_PX}" height="{THUMB_PX}" alt="{_esc(row["uid"])}">'
    else:
        body = f'<div class="txt">{_esc((med.get("text") or row["uid"])[:160])}</div>'
    caption = " · ".join(p for p in (label, note) if p)
    return (f'<div class="m{" k" if row["keep"] else ""}" title="{_esc(row["uid"])}">{body}<br>{_esc(caption)}'
            f'<br>{"kept" if row["keep"] else "dropped"}</div>')


def extremes(df: pd.DataFrame, c: int, n: int = N_MEMBERS_SHOWN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(members, the ``n`` most prototypical, the ``n`` hardest) rows of cluster ``c`` by ``cos_dist``."""
    rows = np.flatnonzero(df["cluster"].to_numpy() == c)
    order = rows[np.argsort(df["cos_dist"].to_numpy()[rows], kind="stable")]
    return rows, order[:n], order[::-1][:n]


def gallery_html(df: pd.DataFrame, clusters: list[int], media: dict) -> str:
    parts = []
    cos = df["cos_dist"].to_numpy()
    for c in clusters:
        rows, proto, hard = extremes(df, c)
        kept = int(df["keep"].to_numpy()[rows].sum())
        parts.append(f"<h3>cluster {c}: {len(rows)} samples, {kept} kept</h3>")
        cols = []
        for title, pick in (("most prototypical (smallest cos_dist)", proto), ("hardest (largest cos_dist)", hard)):
            strip = "".join(member_html(df, i, media, f"cos {cos[i]:.3g}") for i in pick)
            cols.append(f'<div><div class="muted">{title}</div><div class="strip">{strip}</div></div>')
        parts.append(f'<div class="row">{"".join(cols)}</div>')
    return "\n".join(parts)


def _shorten(obj, n: int = 24):
    """JSON with long lists cut to ``n`` items (the full file stays on disk)."""
    if isinstance(obj, dict):
        return {k: _shorten(v, n) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shorten(v, n) for v in obj[:n]] + ([f"... ({len(obj) - n} more)"] if len(obj) > n else [])
    return obj


def eval_html(layout: RunLayout) -> str:
    if not all(p.exists() for p in (layout.curves_png, layout.curves, layout.eval_summary)):
        return ('<p class="muted">No pruning curves yet: run <code>datapruning eval '
                f'{_esc(layout.root)}</code> (needs labels), then this report again.</p>')
    summary = read_json(layout.eval_summary)
    grid = accuracy_grid(pd.read_parquet(layout.curves))
    grid.columns = [f"keep {c}" for c in grid.columns]
    sample = summary.get("sample", {})
    rows = (f'the probe saw a seeded, label-stratified sample of <b>{sample["rows"]}</b> of {sample["labelled_rows"]} '
            f'labelled rows (--max-rows {sample["max_rows"]}); ' if sample else "")
    recipe = summary.get("recommended", {}).get("config")
    return (f'<p><b>{_esc(summary["line"])}</b></p><p class="muted">{rows}linear probe on {summary["train_rows"]} '
            f'training rows, accuracy on {summary["test_rows"]} held-out rows ({_esc(summary["split"])}). Bands and '
            'brackets: 95% intervals over seeds and a bootstrap of the held-out rows.'
            + (f' Runnable recipe: <code>{_esc(recipe)}</code>.' if recipe else "") + '</p>'
            f'<img class="plot" src="{png_uri(layout.curves_png.read_bytes())}" alt="pruning curves">{grid.to_html()}')


def build_report(run_dir, out_path=None) -> Path:
    """Write RUN/report.html (or ``out_path``): one file, every image a base64 data URI. Holds the run folder's
    lock while it reads the run (and writes into it), so no stage changes the outputs it shows meanwhile."""
    with locked(run_dir):
        return _build_report(Path(run_dir), out_path)


def _build_report(run_dir: Path, out_path) -> Path:
    from tqdm.auto import tqdm

    layout = RunLayout(run_dir)
    run = Run(load_run_config(layout.root), layout.root)
    df = load_manifest(run)
    if not layout.stats.exists():
        raise StageError(f"report: {layout.stats} is missing; run 'datapruning manifest --output {layout.root}'")
    stats = read_json(layout.stats)
    metrics = [c[6:] for c in df.columns if c.startswith("score_")]
    k = len(np.load(layout.centroids, allow_pickle=False))
    cluster, keep = df["cluster"].to_numpy(np.int64), df["keep"].to_numpy(bool)
    sizes, kept = np.bincount(cluster, minlength=k), np.bincount(cluster[keep], minlength=k)
    sections: list[tuple[str, str]] = []
    steps = ["curves", "clusters", "dbp", "scores", "labels", "gallery", "duplicates", "config"]
    for step in tqdm(steps, desc="report", unit="section", disable=None, dynamic_ncols=True):
        if step == "curves":
            sections.append(("Pruning curves", eval_html(layout)))
        elif step == "clusters":
            sections.append(("Clusters", f'<img class="plot" src="{plot_clusters(sizes, kept)}" alt="clusters">'))
        elif step == "dbp":
            s, q, c, note = dbp_view(run, df, stats)
            sections.append(("DBP quota vs cluster size", f'<p class="muted">Quotas {_esc(note)}.</p>'
                             f'<img class="plot" src="{plot_dbp(s, q, c, note)}" alt="DBP quota vs cluster size">'))
        elif step == "scores" and metrics:
            sections.append(("Score histograms", f'<img class="plot" src="{plot_scores(df, metrics)}" '
                             f'alt="score histograms: {_esc(", ".join(metrics))}">'))
        elif step == "labels" and "label" in df.columns:
            sections.append(("Kept fraction per label", f'<img class="plot" src="{plot_labels(df["label"], keep)}" '
                             'alt="labels">'))
        elif step == "gallery":
            shown = sample_clusters(sizes)
            pairs = duplicate_pairs(run, df) if "score_semdedup" in df.columns else []
            picks = {int(i) for c in shown for part in extremes(df, c)[1:] for i in part}
            picks |= {i for p in pairs for i in p[:2]}
            media = fetch_media(run, {df["uid"].iloc[i] for i in picks})
            sections.append(("Cluster samples", '<p class="muted">Green border: kept; red: dropped.</p>'
                             + gallery_html(df, shown, media)))
        elif step == "duplicates" and "score_semdedup" in df.columns:
            body = "".join(f'<span class="pair">{member_html(df, i, media, "")}{member_html(df, j, media, "")}'
                           f'<span class="muted">cos sim<br>{sim:.4f}</span></span>' for i, j, sim in pairs)
            sections.append(("SemDeDup duplicate pairs", '<p class="muted">The most duplicated samples and their '
                             f'closest cluster-mate.</p>{body}'))
        elif step == "config":
            cfg = json.dumps(read_json(layout.config), indent=1)
            st = json.dumps(_shorten(stats), indent=1)
            sections.append(("Config and stats", f"<details open><summary>config.json (resolved)</summary><pre>"
                             f"{_esc(cfg)}</pre></details><details><summary>stats.json (long lists cut)"
                             f"</summary><pre>{_esc(st)}</pre></details>"))
    out = Path(out_path) if out_path else layout.report
    write_bytes(out, page(layout.root, stats, metrics, sections).encode("utf-8"))
    return out


def page(run_dir: Path, stats: dict, metrics: list[str], sections) -> str:
    sel = stats.get("select", {})
    cards = [("samples", stats.get("samples_in")), ("kept", f"{stats.get('kept')} ({stats.get('kept_fraction', 0):.1%})"),
             ("clusters", stats.get("clusters", {}).get("k")), ("metrics", ", ".join(metrics) or "-"),
             ("select", " ".join(str(sel.get(key, "")) for key in ("method", "metric", "mode")).strip()),
             ("skipped", stats.get("samples_skipped", 0)),
             ("wall time", f"{sum(stats.get('wall_time_s', {}).values()):.1f} s")]
    body = "".join(f'<div class="card">{_esc(name)}<b>{_esc(v)}</b></div>' for name, v in cards)
    toc = " · ".join(f'<a href="#s{i}">{_esc(t)}</a>' for i, (t, _) in enumerate(sections))
    secs = "".join(f'<h2 id="s{i}">{_esc(t)}</h2>\n{content}\n' for i, (t, content) in enumerate(sections))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f"<title>datapruning report: {_esc(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>datapruning report</h1><div class=\"muted\">{_esc(run_dir.resolve())} · encoder "
            f"{_esc(stats.get('encoder'))}</div><div class=\"cards\">{body}</div><p>{toc}</p>{secs}</body></html>")
