"""Knowledge distillation on pruned data: Hinton KD from cached teacher logits (full, or top-k plus a tail bin).

See docs/methods.md#kd-knowledge-distillation-on-pruned-data.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from ..errors import ConfigError, InputError

# default alpha(keep_fraction): ALPHA_LOW at the full data, growing linearly to ALPHA_HIGH as the kept fraction -> 0
ALPHA_LOW, ALPHA_HIGH = 0.1, 0.9
# temperatures at which a top-k teacher stores its tail mass (one column each of TopK.tail)
TAIL_TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0)


class TopK(NamedTuple):
    """A top-k teacher: its k largest logits ``values`` [n, k] at classes ``indices`` [n, k], and ``tail`` [n, len
    (TAIL_TEMPERATURES)]: ``logsumexp`` over the other classes of ``logits / T`` at each of TAIL_TEMPERATURES,
    with the logits on the same shift as ``values`` (-inf where k = C)."""

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor


def alpha_schedule(keep_fraction: float, low: float = ALPHA_LOW, high: float = ALPHA_HIGH, power: float = 1.0) -> float:
    """The default KD weight for a kept fraction f: ``alpha = low + (high - low) * (1 - f) ** power``.

    Ben-Baruch et al. (ICML 2025) find that the best alpha grows as the kept fraction shrinks, with a small alpha
    near the full data. The defaults give 0.1 at f=1, 0.5 at f=0.5, 0.82 at f=0.1. They are a documented starting
    point, not values fitted to the paper: override ``low``/``high``/``power``, or pass your own alpha."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    if not 0.0 <= low <= high <= 1.0 or power <= 0:
        raise ConfigError(f"need 0 <= low <= high <= 1 and power > 0, got low={low}, high={high}, power={power}")
    return float(low + (high - low) * (1.0 - keep_fraction) ** power)


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor | None, teacher: torch.Tensor | TopK | None,
            alpha: float, T: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``(1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. 2015).

    See docs/methods.md#kd-knowledge-distillation-on-pruned-data.

    ``teacher`` is the teacher's full logits [n, C] (exact KD; what ``datapruning teacher`` stores by default),
    or a ``TopK`` (the opt-in approximation: the KL over the teacher's k classes plus one bin for the rest,
    the student's bin being the logsumexp of its other logits; T must be one of TAIL_TEMPERATURES).
    ``alpha=0`` is plain cross entropy (the teacher may be None); ``alpha=1`` is pure KD (labels may be None).
    ``reduction``: mean, sum or none."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    if T <= 0:
        raise ConfigError(f"T must be > 0, got {T}")
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be mean, sum or none, got {reduction!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float16/bf16 logits: the loss in float32
    per_sample = torch.zeros(student_logits.shape[0], dtype=dtype, device=student_logits.device)
    if alpha < 1.0:
        if labels is None:
            raise InputError("labels are needed when alpha < 1")
        per_sample = per_sample + (1.0 - alpha) * F.cross_entropy(student_logits.to(dtype), labels.long(),
                                                                  reduction="none")
    if alpha > 0.0:
        if teacher is None:
            raise InputError("teacher logits are needed when alpha > 0")
        kl = topk_kl(student_logits, teacher, T) if isinstance(teacher, TopK) else full_kl(student_logits, teacher, T)
        per_sample = per_sample + alpha * T * T * kl
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample KL(softmax(t / T) || softmax(s / T)) over all C classes."""
    if teacher_logits.shape != student_logits.shape:
        raise InputError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must both be [n, C]")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_pt = F.log_softmax(teacher_logits.to(student_logits.device, dtype) / T, dim=-1)
    log_qs = F.log_softmax(student_logits.to(dtype) / T, dim=-1)
    return (log_pt.exp() * (log_pt - log_qs)).sum(dim=-1)


def tail_column(T: float) -> int:
    """The TopK.tail column holding temperature T (a top-k teacher's tail mass exists only at those)."""
    for i, t in enumerate(TAIL_TEMPERATURES):
        if abs(t - T) < 1e-9:
            return i
    raise InputError(f"T={T}: a top-k teacher stores its tail mass at T in {list(TAIL_TEMPERATURES)}; use one of "
                     "those, or store full logits (the default)")


def topk_kl(student_logits: torch.Tensor, teacher: TopK, T: float) -> torch.Tensor:
    """Per-sample KL over k + 1 bins: the teacher's top-k classes and one bin for all the others."""
    values, indices, tail = teacher
    n, c = student_logits.shape
    if values.shape != indices.shape or values.ndim != 2 or values.shape[0] != n or values.shape[1] > c:
        raise InputError(f"teacher top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must both "
                         f"be [n={n}, k<={c}]")
    if tail is None:
        raise InputError("these top-k teacher outputs have no tail mass (written by an older version); rerun "
                         "'datapruning teacher' (full logits by default)")
    dev, dtype = student_logits.device, torch.promote_types(student_logits.dtype, torch.float32)
    column = tail_column(T)
    log_q = F.log_softmax(student_logits.to(dtype) / T, dim=-1)
    idx = indices.to(dev).long()
    t_bins, log_qs = values.to(dev, dtype) / T, log_q.gather(1, idx)
    if values.shape[1] < c:  # k = C: no tail bin
        t_bins = torch.cat([t_bins, tail.to(dev, dtype)[:, column, None]], dim=1)
        log_qs = torch.cat([log_qs, torch.logsumexp(log_q.scatter(1, idx, float("-inf")), dim=-1, keepdim=True)], 1)
    log_pt = F.log_softmax(t_bins, dim=-1)
    return (log_pt.exp() * (log_pt - log_qs)).sum(dim=-1)


def teacher_batch(*tensors: torch.Tensor) -> torch.Tensor | TopK:
    """The teacher argument of ``kd_loss`` from a batch's teacher tensors: (logits,) or (values, indices, tail);
    (values, indices) of older top-k outputs give a TopK without tail, which ``kd_loss`` refuses with a hint."""
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) in (2, 3):
        return TopK(*tensors, *([None] * (3 - len(tensors))))
    raise InputError(f"expected the teacher's (logits,) or (values, indices, tail), got {len(tensors)} tensors")
