"""kd_loss: exact Hinton KD on full logits (against F.kl_div and a float64 reference), top-k with a tail bin."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datapruning.consumers.kd import TAIL_TEMPERATURES, TopK, alpha_schedule, kd_loss, teacher_batch
from datapruning.consumers.teacher import topk


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference(student, labels, teacher, alpha, T):
    """Float64, written from the formula: L = (1-a) CE(y, s) + a T^2 KL(softmax(t/T) || softmax(s/T))."""
    total = 0.0
    for i in range(len(student)):
        ce = -log_softmax(student[i])[labels[i]]
        log_p, log_q = log_softmax(teacher[i] / T), log_softmax(student[i] / T)
        kl = sum(np.exp(log_p[j]) * (log_p[j] - log_q[j]) for j in range(student.shape[1]))
        total += (1 - alpha) * ce + alpha * T * T * kl
    return total / len(student)


def classifier_logits(n=256, c=1000, d=256, scale=25.0, spread=2.5, seed=0):
    """Teacher and student logits that look like a trained 1000-class classifier's: ``scale * cos(x, w_c)`` of a
    cosine classifier (scale 25, in the 16-30 range such heads learn) on embeddings around their class
    prototype. Mean top-1 probability 0.72 (ImageNet ResNet-50 is about 0.7-0.8); 22%, 87% and 97% of the
    mass lies outside the top 10 at T = 1, 2, 4. The student sees noisier embeddings with a smaller scale."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(c, d))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    y = rng.integers(c, size=n)
    x = protos[y] + spread * rng.normal(size=(n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xs = x + 1.5 * rng.normal(size=(n, d)) / np.sqrt(d)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    return scale * x @ protos.T, 20.0 * xs @ protos.T, y


def case(n=6, c=7, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, c)) * scale, rng.integers(c, size=n), rng.normal(size=(n, c)) * scale


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_full_logits_loss_and_gradient_match_kl_div_on_a_realistic_teacher(T):
    """The default (full logits) against F.kl_div on the same float32 logits: loss and gradient within 1e-3
    relative; and as stored (float16 after a max shift): the loss within 1e-3, the gradient within 2e-3."""
    t, s, y = classifier_logits()
    stored = (t - t.max(1, keepdims=True)).astype(np.float16)  # what the teacher stage writes
    s0 = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    want = F.kl_div(F.log_softmax(s0 / T, 1), F.log_softmax(torch.tensor(t, dtype=torch.float32) / T, 1),
                    reduction="batchmean", log_target=True) * T * T
    want.backward()
    for teacher, grad_tol in ((torch.tensor(t, dtype=torch.float32), 1e-3), (torch.tensor(stored), 2e-3)):
        s1 = torch.tensor(s, dtype=torch.float32, requires_grad=True)
        got = kd_loss(s1, None, teacher, alpha=1.0, T=T)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-3)
        assert (s1.grad - s0.grad).norm() <= grad_tol * s0.grad.norm()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_full_logits_match_float64_reference(alpha, T):
    s, y, t = case(seed=int(alpha * 10 + T))
    got = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(t), alpha, T)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference(s, y, t, alpha, T), rel=1e-10, abs=1e-12)


def topk_teacher(t: np.ndarray, k: int) -> TopK:
    values, indices, tail = topk(t, k)
    return TopK(torch.tensor(values), torch.tensor(indices), torch.tensor(tail))


def binned_reference(s, t, k, T):
    """Float64 KL over k + 1 bins: the teacher's top-k classes and the sum of the rest, for both distributions."""
    out = []
    for i in range(len(s)):
        top = np.argsort(-t[i], kind="stable")[:k]
        rest = np.setdiff1d(np.arange(t.shape[1]), top)
        p, q = np.exp(log_softmax(t[i] / T)), np.exp(log_softmax(s[i] / T))
        pb, qb = np.r_[p[top], p[rest].sum()], np.r_[q[top], q[rest].sum()]
        out.append(sum(a * np.log(a / b) for a, b in zip(pb, qb) if a > 0))
    return np.mean(out)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_topk_with_tail_bin_is_the_binned_kl(k, T):
    s, y, t = case(seed=k)
    got = kd_loss(torch.tensor(s), None, topk_teacher(t, k), alpha=1.0, T=T)
    assert got.item() == pytest.approx(T * T * binned_reference(s, t, k, T), rel=1e-3)  # float16 values
    if k == 7:  # k = C: the exact KD
        assert got.item() == pytest.approx(kd_loss(torch.tensor(s), None, torch.tensor(t), 1.0, T).item(), rel=1e-3)


def topk_errors(n=1024):
    """Relative error of the KD term and of its gradient, top-k + tail bin vs full logits (the table in
    docs/methods.md#kd-knowledge-distillation-on-pruned-data comes from ``topk_errors(1024)``)."""
    t, s, y = classifier_logits(n=n)
    out = {}
    for k in (10, 50, 100):
        for T in (1.0, 2.0, 4.0):
            s1 = torch.tensor(s, requires_grad=True)
            s2 = torch.tensor(s, requires_grad=True)
            full = kd_loss(s1, None, torch.tensor(t), 1.0, T)
            approx = kd_loss(s2, None, topk_teacher(t, k), 1.0, T)
            full.backward()
            approx.backward()
            out[k, T] = (abs(approx.item() - full.item()) / full.item(),
                         ((s2.grad - s1.grad).norm() / s1.grad.norm()).item())
    return out


def test_topk_error_shrinks_with_k_and_grows_with_T():
    err = topk_errors(256)
    for T in (1.0, 2.0, 4.0):
        assert err[10, T][0] >= err[50, T][0] >= err[100, T][0]
    for k in (10, 50, 100):
        assert err[k, 1.0][0] <= err[k, 2.0][0] <= err[k, 4.0][0]


def test_topk_needs_a_stored_temperature_and_a_tail():
    s, y, t = case()
    with pytest.raises(ValueError, match="tail mass at T in"):
        kd_loss(torch.tensor(s), None, topk_teacher(t, 3), 1.0, 1.5)
    v, i, _ = topk_teacher(t, 3)
    with pytest.raises(ValueError, match="no tail mass"):
        kd_loss(torch.tensor(s), None, teacher_batch(v, i), 1.0, 2.0)
    assert 4.0 in TAIL_TEMPERATURES and isinstance(teacher_batch(v, i, _), TopK)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    s, y, _ = case()
    got = kd_loss(torch.tensor(s), torch.tensor(y), None, alpha=0.0, T=3.0)
    assert got.item() == pytest.approx(F.cross_entropy(torch.tensor(s), torch.tensor(y)).item(), rel=1e-12)


def test_alpha_one_is_pure_kd_and_needs_no_labels():
    s, y, t = case()
    a = kd_loss(torch.tensor(s), None, torch.tensor(t), alpha=1.0, T=2.0)
    assert a.item() == kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(t), alpha=1.0, T=2.0).item()
    assert abs(kd_loss(torch.tensor(t), None, torch.tensor(t), 1.0, 3.0).item()) < 1e-12


def test_gradient_flows_and_reductions():
    s, y, t = case()
    st = torch.tensor(s, requires_grad=True)
    per = kd_loss(st, torch.tensor(y), torch.tensor(t), 0.7, 4.0, reduction="none")
    assert per.shape == (len(s),)
    per.mean().backward()
    assert torch.isfinite(st.grad).all() and st.grad.abs().sum() > 0
    total = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(t), 0.7, 4.0, reduction="sum")
    assert total.item() == pytest.approx(per.sum().item(), rel=1e-12)
    st = torch.tensor(s, requires_grad=True)
    kd_loss(st, None, topk_teacher(s * 0.5, 7), 1.0, 2.0).backward()  # k = C with a top-k teacher: finite
    assert torch.isfinite(st.grad).all()


def test_bad_arguments_name_the_problem():
    s, y, t = case()
    args = (torch.tensor(s), torch.tensor(y), torch.tensor(t))
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(*args, alpha=1.5, T=1.0)
    with pytest.raises(ValueError, match="T must"):
        kd_loss(*args, alpha=0.5, T=0.0)
    with pytest.raises(ValueError, match="teacher logits are needed"):
        kd_loss(args[0], args[1], None, alpha=0.5, T=1.0)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(args[0], None, args[2], alpha=0.5, T=1.0)
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        kd_loss(args[0], args[1], args[2][:3], alpha=0.5, T=1.0)


def test_alpha_schedule_grows_as_kept_fraction_shrinks():
    fractions = np.linspace(0, 1, 11)
    alphas = [alpha_schedule(f) for f in fractions]
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert alpha_schedule(1.0) == pytest.approx(0.1) and alpha_schedule(0.5) == pytest.approx(0.5)
    assert alpha_schedule(0.0) == pytest.approx(0.9)
    assert alpha_schedule(0.5, low=0.0, high=1.0, power=2.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        alpha_schedule(1.2)
    with pytest.raises(ValueError):
        alpha_schedule(0.5, low=0.9, high=0.1)
