"""The README's Python examples run as written and produce what the README says they produce."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_run

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
MARKERS = {"api": "from datapruning.cluster import", "webdataset": "KeptFilter", "trainers": "ManifestDataset"}


def block(name: str) -> str:
    found = [b for b in BLOCKS if MARKERS[name] in b]
    assert len(found) == 1, f"README: expected one python block with {MARKERS[name]!r}, found {len(found)}"
    return found[0]


def run_readme(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README of this repository, by design
    return namespace


def test_every_readme_block_is_checked():
    unchecked = [b[:80] for b in BLOCKS if not any(m in b for m in MARKERS.values())]
    assert not unchecked, f"README python blocks without expectations in this file: {unchecked}"


# ---------------------------------------------------------------- Use 2: the scoring functions
@pytest.fixture(scope="module")
def api() -> dict[str, dict]:
    """The API example run part by part (split at its '# METHOD' comments), a snapshot of names after each."""
    parts = re.split(r"\n\n(?=# )", block("api"))
    namespace: dict = {}
    snapshots = {}
    for part in parts:
        exec(compile(part, "README.md", "exec"), namespace)  # noqa: S102 - the README of this repository
        title = part.split()[1].rstrip(":,") if part.startswith("# ") else "setup"
        snapshots[title] = dict(namespace)
    assert set(snapshots) == {"setup", "SSP", "SemDeDup", "DBP", "DP4TL", "EL2N", "Random", "CLIP"}, sorted(snapshots)
    return snapshots


def test_api_setup_embeds_and_clusters(api):
    ns = api["setup"]
    x, centroids, cluster, cos_dist = ns["x"], ns["centroids"], ns["cluster"], ns["cos_dist"]
    assert x.shape == (2000, 64) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert centroids.shape == (20, 64)
    assert cluster.shape == (2000,) and cluster.min() >= 0 and cluster.max() < 20
    assert cos_dist.shape == (2000,) and cos_dist.min() >= -1e-5 and cos_dist.max() <= 2 + 1e-5
    best = np.argmax(x @ centroids.T, axis=1)  # assigned to the nearest centroid
    assert np.array_equal(cluster, best)


def test_api_ssp_keeps_n_with_cluster_floors(api):
    ns = api["SSP"]
    ssp, keep, cluster = ns["ssp"], ns["keep"], ns["cluster"]
    assert np.allclose(ssp, ns["cos_dist"], atol=1e-5)  # 1 - <x_i, c_a(i)>
    assert keep.dtype == bool and keep.sum() == 1000
    floor = math.ceil(0.2 * 1000 / 20)
    sizes, kept = np.bincount(cluster, minlength=20), np.bincount(cluster[keep], minlength=20)
    assert (kept >= np.minimum(sizes, floor)).all()


def test_api_semdedup_masks_and_eps(api):
    ns = api["SemDeDup"]
    dup, masks, removed, eps = ns["dup"], ns["masks"], ns["removed"], ns["eps"]
    assert dup.shape == (2000,)
    assert sorted(masks) == sorted(removed) == [0.001, 0.01, 0.03]
    assert all(removed[e] == masks[e].sum() for e in masks)
    assert removed[0.001] <= removed[0.01] <= removed[0.03]  # a larger eps removes more
    assert 0.0 <= eps <= 2.0
    assert (dup <= 1 - eps).sum() >= math.ceil(0.8 * 2000)  # keeps at least 80%


def test_api_dbp_quotas_sum_to_n(api):
    ns = api["DBP"]
    quotas, sizes = ns["quotas"], np.bincount(ns["cluster"], minlength=20)
    assert ns["C"].shape == (20,) and np.isfinite(ns["C"]).all()
    assert quotas.shape == (20,) and quotas.sum() == 600
    assert ((quotas >= np.minimum(1, sizes)) & (quotas <= sizes)).all()


def test_api_dp4tl_keeps_the_most_hit_clusters(api):
    ns = api["DP4TL"]
    freq, kept = ns["freq"], np.asarray(ns["kept_clusters"])
    assert freq.shape == (20,) and freq.sum() == 100
    assert len(kept) == 10 and len(set(kept.tolist())) == 10
    others = np.setdiff1d(np.arange(20), kept)
    assert freq[kept].min() >= freq[others].max()


def test_api_el2n_then_ccs_keeps_n(api):
    ns = api["EL2N"]
    el2n, keep = ns["el2n"], ns["keep"]
    assert el2n.shape == (2000,) and np.isfinite(el2n).all() and el2n.min() >= 0 and el2n.max() <= math.sqrt(2) + 1e-6
    assert keep.dtype == bool and keep.sum() == 600
    assert 0.0 < ns["M"].ccs_default_beta(0.7) < 0.2  # between the 50% and 80% anchors


def test_api_random_keeps_n_by_uid(api):
    ns = api["Random"]
    keep, M = ns["keep"], ns["M"]
    assert keep.dtype == bool and keep.sum() == 1000
    uids = [f"id{i}" for i in range(2000)]
    scores = M.random_scores(uids, seed=0)
    assert np.array_equal(M.random_scores(uids[::-1], seed=0), scores[::-1])  # keyed by uid, not by row


# ---------------------------------------------------------------- Use 3: the loaders
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_clip_config) -> Path:
    """A finished run where the README's examples look for it: ``runs/demo/run`` under the returned folder."""
    root = tmp_path_factory.mktemp("readme")
    make_tiny_run(root / "runs" / "demo", tiny_clip_config, n_shards=3, per_shard=12)
    return root


def kept_uids(root: Path) -> set[str]:
    return set(pq.read_table(root / "runs/demo/run/kept.parquet", columns=["uid"])["uid"].to_pylist())


def test_webdataset_filter_yields_exactly_the_kept_samples(demo_run, monkeypatch):
    monkeypatch.chdir(demo_run)
    ns = run_readme(block("webdataset"))
    stats = json.loads((demo_run / "runs/demo/run/stats.json").read_text())
    samples = list(ns["ds"])
    assert 0 < stats["kept"] < stats["samples_in"]
    assert len(samples) == stats["kept"]
    assert {f"{Path(s['__url__']).stem}/{s['__key__']}" for s in samples} == kept_uids(demo_run)
    assert all(s["png"].size == (32, 32) for s in samples)  # decoded by .decode("pil")


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # the README's num_workers=8
def test_trainer_loaders_see_the_kept_samples(demo_run, monkeypatch):
    monkeypatch.chdir(demo_run)
    ns = run_readme(block("trainers"))
    stats = json.loads((demo_run / "runs/demo/run/stats.json").read_text())
    uids = [u for batch in ns["loader"] for u in batch["uid"]]
    assert len(uids) == stats["kept"] and set(uids) == kept_uids(demo_run)  # every kept sample once, no others
    hf, df = ns["hf"], ns["df"]
    assert len(hf) == stats["kept"] and set(hf["uid"]) == kept_uids(demo_run)
    assert len(df) == stats["samples_in"] and int(df["keep"].sum()) == stats["kept"]
    assert {"uid", "shard", "key", "cluster", "cos_dist", "keep"} <= set(df.columns)


def test_api_clip_score_and_datacomps_top_fraction(api):
    ns = api["CLIP"]
    x, t, clip, keep = ns["x"], ns["t"], ns["clip"], ns["keep"]
    assert np.allclose(clip, np.sum(x * t, axis=1), atol=1e-5) and 0.5 < clip.mean() < 1
    threshold = -np.sort(-clip)[int(0.3 * len(clip))]  # DataComp's get_threshold
    assert np.array_equal(keep, clip >= threshold) and keep.sum() == int(0.3 * len(clip)) + 1
