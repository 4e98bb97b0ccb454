"""EL2N: the formula on logits/probabilities, the proxy heads, and the adapter's uid alignment."""
import importlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning.score import METRICS
from datapruning.score.base import ScoreInputs
from datapruning.metrics.el2n import el2n, el2n_proxy

el2n_mod = importlib.import_module("datapruning.metrics.el2n")  # the package attribute `el2n` is the function


def _direct(logits, labels):
    out = np.zeros(logits.shape[1])
    for m in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            p = np.exp(logits[m, i]) / np.exp(logits[m, i]).sum()
            out[i] += np.linalg.norm(p - np.eye(logits.shape[2])[labels[i]]) / logits.shape[0]
    return out


def test_hand_case():
    assert el2n(np.zeros((1, 2)), np.array([0]))[0] == pytest.approx(np.sqrt(0.5))
    assert el2n(np.array([[[0.0, 50.0]]]), np.array([1]))[0] == pytest.approx(0.0, abs=1e-12)
    assert el2n(np.array([[[0.0, 50.0]]]), np.array([0]))[0] == pytest.approx(np.sqrt(2.0))
    probs = np.array([[0.2, 0.8], [0.5, 0.5]])
    np.testing.assert_allclose(el2n(probs, np.array([1, 1]), from_logits=False), [np.sqrt(0.08), np.sqrt(0.5)])


def test_matches_the_formula_and_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11, 5)) * 4
    labels = rng.integers(0, 5, 11)
    want = _direct(logits, labels)
    np.testing.assert_allclose(el2n(logits, labels), want, atol=1e-12)
    monkeypatch.setattr(el2n_mod, "BLOCK_BYTES", 160)  # one row (3 x 5 float64) per block
    np.testing.assert_allclose(el2n(logits.astype(np.float32), labels), want, atol=1e-5)
    with pytest.raises(ValueError):
        el2n(logits, np.full(11, 5))
    with pytest.raises(ValueError):
        el2n(logits, labels[:4])


def _blobs(n=2000, d=16, c=4, seed=0, flip=0.1):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)) * 2
    y = rng.integers(0, c, n)
    x = means[y] + rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    flipped = rng.random(n) < flip
    y_noisy = np.where(flipped, (y + 1) % c, y)
    return x, y_noisy, flipped


def test_proxy_flags_mislabelled_rows_and_is_seeded():
    x, y, flipped = _blobs()
    a = el2n_proxy(x, y, n_models=4, epochs=10, seed=0)
    assert a.shape == (len(x),) and (a >= 0).all() and (a <= np.sqrt(2) + 1e-9).all()
    assert a[flipped].mean() > a[~flipped].mean() + 0.3
    np.testing.assert_array_equal(a, el2n_proxy(x, y, n_models=4, epochs=10, seed=0))
    assert not np.allclose(a, el2n_proxy(x, y, n_models=4, epochs=10, seed=1))
    mlp = el2n_proxy(x, y, n_models=2, epochs=2, hidden=8, seed=0)
    assert np.isfinite(mlp).all() and mlp[flipped].mean() > mlp[~flipped].mean()


def test_proxy_degenerate_inputs():
    x, _, _ = _blobs(n=50)
    np.testing.assert_array_equal(el2n_proxy(x, np.zeros(50, np.int64), n_models=2, epochs=1), 0.0)  # one class
    with pytest.raises(ValueError):
        el2n_proxy(x, -np.ones(50, np.int64))
    with pytest.raises(ValueError):
        el2n_proxy(x, np.zeros(50, np.int64), n_models=0)


def _inputs(x, y):
    n = len(x)
    return ScoreInputs(uid=np.array([f"s{i}" for i in range(n)]), embeddings=x, cluster=np.zeros(n, np.int64),
                       cos_dist=np.zeros(n, np.float32), centroids=x[:1], labels=y, seed=0)


def test_adapter_aligns_logits_by_uid(tmp_path):
    rng = np.random.default_rng(1)
    x, y, _ = _blobs(n=30)
    y = y.copy()
    y[4] = -1  # unlabelled
    inp = _inputs(x, y)
    logits = rng.normal(size=(2, 30, 4))
    perm = rng.permutation(30)[:25]  # the logits file covers 25 samples, in another order
    np.save(tmp_path / "logits.npy", logits[:, perm])
    pq.write_table(pa.table({"uid": inp.uid[perm]}), tmp_path / "uids.parquet")
    out = METRICS["el2n"](inp, logits=str(tmp_path / "logits.npy"), logits_uids=str(tmp_path / "uids.parquet"))
    covered = np.isin(np.arange(30), perm) & (y >= 0)
    np.testing.assert_allclose(out.scores[covered], _direct(logits[:, covered], y[covered]), atol=1e-12)
    assert np.isnan(out.scores[~covered]).all() and out.info["scored"] == covered.sum()
    np.save(tmp_path / "uids.npy", inp.uid[perm])
    again = METRICS["el2n"](inp, logits=str(tmp_path / "logits.npy"), logits_uids=str(tmp_path / "uids.npy"))
    np.testing.assert_array_equal(again.scores, out.scores)
    with pytest.raises(ValueError):
        METRICS["el2n"](inp, logits=str(tmp_path / "logits.npy"))


def test_adapter_proxy_needs_labels():
    x, y, _ = _blobs(n=100)
    out = METRICS["el2n"](_inputs(x, y), n_models=2, epochs=1)
    assert np.isfinite(out.scores).all() and out.info["route"] == "proxy"
    with pytest.raises(ValueError, match="labels"):
        METRICS["el2n"](_inputs(x, None))


def _el2n_run(tmp_path, labels, logits, extra=()):
    """EL2N from supplied logits through the pipeline; {uid: score}."""
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    n = len(labels)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = [f"u{i:03d}" for i in range(n)]
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": uids, "embedding": pa.array(list(x), pa.list_(pa.float32())), "label": labels}),
                   tmp_path / "in" / "part-000.parquet")
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "uids.npy", np.array(uids))
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=2", "score.metrics=[el2n]",
                             f"score.params.el2n.logits={tmp_path / 'logits.npy'}",
                             f"score.params.el2n.logits_uids={tmp_path / 'uids.npy'}", *extra])
    run_pipeline(cfg, str(tmp_path / "in"), tmp_path / "run", stages=("embed", "cluster", "score"))
    table = pq.read_table(tmp_path / "run" / "scores")
    return dict(zip(table["uid"].to_pylist(), table["score_el2n"].to_pylist()))


def test_el2n_logits_column_is_the_label(tmp_path):
    """Integer labels {3, 17, 999} are logits columns 3, 17, 999; string labels are matched by name."""
    labels = [3, 17, 999] * 4
    logits = np.full((12, 1000), -20.0, np.float32)
    logits[np.arange(12), labels] = 20.0  # every model is right: EL2N ~ 0
    logits[0, :] = -20.0
    logits[0, 17] = 20.0  # sample 0 (label 3) predicted as 17: EL2N ~ sqrt(2)
    got = _el2n_run(tmp_path, labels, logits)
    assert got["u000"] == pytest.approx(np.sqrt(2), abs=1e-6)
    assert max(v for u, v in got.items() if u != "u000") < 1e-6

    names = ["zebra", "ant", "moth"] * 4
    columns = ["moth", "zebra", "ant"]  # the model's column order, not the sorted one
    logits = np.full((12, 3), -20.0, np.float32)
    logits[np.arange(12), [columns.index(v) for v in names]] = 20.0
    with pytest.raises(ValueError, match="classes"):
        _el2n_run(tmp_path / "s1", names, logits)
    (tmp_path / "classes.txt").write_text("\n".join(columns))
    got = _el2n_run(tmp_path / "s2", names, logits, [f"score.params.el2n.classes={tmp_path / 'classes.txt'}"])
    assert max(got.values()) < 1e-6


def test_proxy_trains_in_float64_with_ieee_arithmetic_on_every_thread(monkeypatch):
    """The heads train in float64 and denormals are not flushed (torch would flush on the calling thread only,
    which makes a result depend on the thread count); a small step runs on one thread, restored afterwards."""
    import torch

    seen = []
    forward = el2n_mod._forward

    def spy(params, x):
        tiny = torch.tensor([1e-39], dtype=torch.float32)
        threads = torch.get_num_threads() if params[0].requires_grad else "scoring"
        seen.append((params[0].dtype, x.dtype, float(tiny * 1.0) != 0.0, threads))
        return forward(params, x)

    x, y, _ = _blobs(n=300)
    before = torch.get_num_threads()
    monkeypatch.setattr(el2n_mod, "_forward", spy)
    el2n_proxy(x, y, n_models=2, epochs=1, seed=0)
    assert set(seen) == {(torch.float64, torch.float64, True, 1), (torch.float64, torch.float64, True, "scoring")}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("classes,hidden", [(3, 0), (37, 0), (1000, 0), (29, 5)])
def test_blocks_and_head_groups_give_the_same_bits(monkeypatch, classes, hidden):
    """A tiny block budget (one head per training step, a row or two per scoring block) gives bit for bit the
    weights and scores of one block for everything; the budget only bounds memory."""
    rng = np.random.default_rng(classes)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = rng.integers(0, classes, 300)
    logits = rng.normal(size=(3, 300, classes)).astype(np.float32)
    runs = []
    for budget in (1 << 40, 8):
        monkeypatch.setattr(el2n_mod, "BLOCK_BYTES", budget)
        heads = el2n_mod.train_proxy_heads(x, y, classes, n_models=4, epochs=2, hidden=hidden, seed=1, batch_size=64)
        runs.append((heads, el2n_mod.proxy_el2n(heads, x, y), el2n(logits, y)))
        assert el2n_mod.heads_per_group(4, 64, classes + hidden) == (4 if budget > 8 else 1)
    (big_heads, big, big_logits), (small_heads, small, small_logits) = runs
    for a, b in zip(big_heads, small_heads):
        assert a.tobytes() == b.tobytes()
    assert big.tobytes() == small.tobytes() and big_logits.tobytes() == small_logits.tobytes()
    assert np.isfinite(big).all() and len(np.unique(big)) > 100  # real scores, not a constant


def test_adam_step_is_torch_adam_bit_for_bit():
    """The heads' optimizer step, applied per group of heads, is ``torch.optim.Adam``'s (defaults, CPU)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    ref = ours.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2)
    moments = (torch.zeros_like(ours), torch.zeros_like(ours))
    for step in range(1, 6):
        grad = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 10.0 ** (step - 3)
        ref.grad = grad.clone()
        opt.step()
        for g0 in (0, 1):  # heads 0 and 1..2: two groups
            sl = slice(g0, 1 if g0 == 0 else 3)
            el2n_mod._adam_step(ours[sl], grad[sl], moments[0][sl], moments[1][sl], step, 1e-2)
        assert ours.numpy().tobytes() == ref.detach().numpy().tobytes()
    assert not torch.equal(ours, torch.zeros_like(ours))
