"""kd_loss against a float64 reference of docs/methods.md#kd-knowledge-distillation-on-pruned-data, edge cases, alpha schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datapruning.consumers.kd import alpha_schedule, kd_loss


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference(student, labels, teacher_full, k, alpha, T):
    """Float64, written from the formula: L = (1-a) CE(y, s) + a T^2 KL(p_t || softmax(s/T)), where p_t is the
    teacher's softmax(t/T) restricted to its k largest logits and renormalised (a dense C-vector, 0 elsewhere)."""
    n, c = student.shape
    total = 0.0
    for i in range(n):
        ce = -log_softmax(student[i])[labels[i]]
        p_full = np.exp(log_softmax(teacher_full[i] / T))
        top = np.argsort(-teacher_full[i], kind="stable")[:k]
        p = np.zeros(c)
        p[top] = p_full[top] / p_full[top].sum()
        log_q = log_softmax(student[i] / T)
        kl = sum(p[j] * (np.log(p[j]) - log_q[j]) for j in range(c) if p[j] > 0)
        total += (1 - alpha) * ce + alpha * T * T * kl
    return total / n


def case(n=6, c=7, k=3, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(n, c)) * scale, rng.normal(size=(n, c)) * scale
    y = rng.integers(c, size=n)
    idx = np.argsort(-t, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(t, idx, axis=1)
    return s, y, t, vals, idx


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_float64_reference(alpha, T, k):
    s, y, t, vals, idx = case(k=k, seed=int(alpha * 10 + T + k))
    got = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(vals), torch.tensor(idx), alpha, T)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference(s, y, t, k, alpha, T), rel=1e-10, abs=1e-12)
    # as stored: float16 teacher values, int32 indices, float32 student; the reference sees the same rounding
    t16 = t.astype(np.float16).astype(np.float64)
    got32 = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(y), torch.tensor(vals.astype(np.float16)),
                    torch.tensor(idx, dtype=torch.int32), alpha, T)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(reference(s, y, t16, k, alpha, T), rel=1e-5, abs=1e-6)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    s, y, *_ = case()
    got = kd_loss(torch.tensor(s), torch.tensor(y), None, None, alpha=0.0, T=3.0)
    assert got.item() == pytest.approx(F.cross_entropy(torch.tensor(s), torch.tensor(y)).item(), rel=1e-12)


def test_alpha_one_is_pure_kd_and_needs_no_labels():
    s, y, t, vals, idx = case(k=7)
    a = kd_loss(torch.tensor(s), None, torch.tensor(vals), torch.tensor(idx), alpha=1.0, T=2.0)
    b = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(vals), torch.tensor(idx), alpha=1.0, T=2.0)
    assert a.item() == b.item()
    # labels do not matter at alpha=1, and do at alpha<1
    y2 = (y + 1) % s.shape[1]
    c = kd_loss(torch.tensor(s), torch.tensor(y2), torch.tensor(vals), torch.tensor(idx), alpha=0.5, T=2.0)
    assert c.item() != pytest.approx(kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(vals),
                                             torch.tensor(idx), alpha=0.5, T=2.0).item())


@pytest.mark.parametrize("T", [1.0, 4.0, 50.0])
def test_full_topk_equals_full_softmax_kd(T):
    s, y, t, vals, idx = case(k=7, seed=3)
    st, tt = torch.tensor(s), torch.tensor(t)
    full = F.kl_div(F.log_softmax(st / T, 1), F.log_softmax(tt / T, 1), reduction="batchmean", log_target=True) * T * T
    got = kd_loss(st, torch.tensor(y), torch.tensor(vals), torch.tensor(idx), alpha=1.0, T=T)
    assert got.item() == pytest.approx(full.item(), rel=1e-10)


def test_kd_is_zero_when_student_equals_teacher_and_column_order_does_not_matter():
    s, y, t, vals, idx = case(k=7, seed=4)
    same = kd_loss(torch.tensor(t), None, torch.tensor(vals), torch.tensor(idx), alpha=1.0, T=3.0)
    assert abs(same.item()) < 1e-12
    perm = np.random.default_rng(0).permutation(3)
    _, _, _, v3, i3 = case(k=3, seed=5)
    a = kd_loss(torch.tensor(s), None, torch.tensor(v3), torch.tensor(i3), 1.0, 2.0)
    b = kd_loss(torch.tensor(s), None, torch.tensor(v3[:, perm]), torch.tensor(i3[:, perm]), 1.0, 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_gradient_flows_and_reductions():
    s, y, t, vals, idx = case(k=3)
    st = torch.tensor(s, requires_grad=True)
    per = kd_loss(st, torch.tensor(y), torch.tensor(vals), torch.tensor(idx), 0.7, 4.0, reduction="none")
    assert per.shape == (len(s),)
    per.mean().backward()
    assert torch.isfinite(st.grad).all() and st.grad.abs().sum() > 0
    total = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(vals), torch.tensor(idx), 0.7, 4.0, reduction="sum")
    assert total.item() == pytest.approx(per.sum().item(), rel=1e-12)


def test_bad_arguments_name_the_problem():
    s, y, t, vals, idx = case(k=3)
    args = (torch.tensor(s), torch.tensor(y), torch.tensor(vals), torch.tensor(idx))
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(*args, alpha=1.5, T=1.0)
    with pytest.raises(ValueError, match="T must"):
        kd_loss(*args, alpha=0.5, T=0.0)
    with pytest.raises(ValueError, match="teacher top-k"):
        kd_loss(args[0], args[1], None, None, alpha=0.5, T=1.0)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(args[0], None, args[2], args[3], alpha=0.5, T=1.0)
    with pytest.raises(ValueError, match=r"\[n=6"):
        kd_loss(args[0], args[1], args[2][:3], args[3][:3], alpha=0.5, T=1.0)


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
