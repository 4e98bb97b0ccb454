"""SSP: prototypicality, and supervised SSP ranked within each source (class prototypes vs clusters)."""
import numpy as np
import pytest

from datapruning.metrics.ssp import distance_histogram, within_source_cdf
from datapruning.score import METRICS
from datapruning.score.base import ScoreInputs


def _mixed(seed=0, n=4000, d=16, classes=4, unlabelled=0.3):
    """Tight classes (small prototype distances); one coarse centroid (large cluster distances)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(classes, size=n)
    x = centres[truth] + 0.15 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    centroid = x.mean(axis=0)
    centroid = (centroid / np.linalg.norm(centroid))[None].astype(np.float32)
    labels = np.where(rng.random(n) < unlabelled, -1, truth)
    return ScoreInputs(uid=np.arange(n).astype(str), embeddings=x, cluster=np.zeros(n, np.int64),
                       cos_dist=(1 - x @ centroid[0]).astype(np.float32), centroids=centroid, labels=labels, seed=seed)


def test_supervised_ssp_ranks_within_source():
    """The two sources' distances differ in scale; the hardest 30% holds unlabelled rows at their base rate."""
    inp = _mixed()
    unl = inp.labels < 0
    out = METRICS["ssp"](inp, prototypes="labels")
    assert out.scores.min() >= 0 and out.scores.max() <= 1
    hardest = np.argsort(-out.scores, kind="stable")[: int(0.3 * len(unl))]
    assert abs(unl[hardest].mean() - unl.mean()) < 0.03
    rank = np.argsort(np.argsort(out.scores[unl]))  # within a source, the raw distances' order is kept
    np.testing.assert_array_equal(rank, np.argsort(np.argsort(inp.cos_dist[unl])))
    assert out.info["rows_by_source"] == {"labelled": int((~unl).sum()), "unlabelled": int(unl.sum())}


def test_within_source_cdf_is_the_empirical_rank():
    rng = np.random.default_rng(1)
    values = np.r_[rng.uniform(0, 0.1, 500), rng.uniform(0.5, 1.5, 300)]
    source = np.r_[np.zeros(500, int), np.ones(300, int)]
    cdf = within_source_cdf(values, source, distance_histogram(values, source))
    for s in (0, 1):
        v = values[source == s]
        exact = (np.argsort(np.argsort(v)) + 0.5) / len(v)
        np.testing.assert_allclose(cdf[source == s], exact, atol=1.5 / len(v))


def test_unsupervised_ssp_is_the_cluster_distance():
    inp = _mixed(2)
    out = METRICS["ssp"](inp)
    np.testing.assert_allclose(out.scores, inp.cos_dist.astype(np.float64))
    with pytest.raises(ValueError):
        METRICS["ssp"](ScoreInputs(**{**inp.__dict__, "labels": None}), prototypes="labels")
