"""Knowledge distillation on pruned data: Hinton KD from cached top-k teacher logits.

See docs/methods.md#kd-knowledge-distillation-on-pruned-data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# default alpha(keep_fraction): ALPHA_LOW at the full data, growing linearly to ALPHA_HIGH as the kept fraction -> 0
ALPHA_LOW, ALPHA_HIGH = 0.1, 0.9


def alpha_schedule(keep_fraction: float, low: float = ALPHA_LOW, high: float = ALPHA_HIGH, power: float = 1.0) -> float:
    """The default KD weight for a kept fraction f: ``alpha = low + (high - low) * (1 - f) ** power``.

    Ben-Baruch et al. (ICML 2025) find that the best alpha grows as the kept fraction shrinks, with a small alpha
    near the full data. The defaults give 0.1 at f=1, 0.5 at f=0.5, 0.82 at f=0.1. They are a documented starting
    point, not values fitted to the paper: override ``low``/``high``/``power``, or pass your own alpha."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    if not 0.0 <= low <= high <= 1.0 or power <= 0:
        raise ValueError(f"need 0 <= low <= high <= 1 and power > 0, got low={low}, high={high}, power={power}")
    return float(low + (high - low) * (1.0 - keep_fraction) ** power)


def teacher_log_probs(topk_values: torch.Tensor, T: float) -> torch.Tensor:
    """log of the teacher's tempered softmax renormalised to its top k classes: ``log_softmax(values / T)``.

    Restricting softmax(t / T) to the top-k set S and renormalising gives exp(t_i / T) / sum_{j in S} exp(t_j / T),
    which is exactly the softmax of the k stored logits, so cached top-k logits serve every temperature."""
    return F.log_softmax(topk_values.to(torch.promote_types(topk_values.dtype, torch.float32)) / T, dim=-1)


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor | None, teacher_topk_values: torch.Tensor | None,
            teacher_topk_indices: torch.Tensor | None, alpha: float, T: float = 1.0,
            reduction: str = "mean") -> torch.Tensor:
    """``(1 - alpha) * CE(y, s) + alpha * T^2 * KL(p_t || softmax(s / T))`` (Hinton et al. 2015).

    See docs/methods.md#kd-knowledge-distillation-on-pruned-data.

    ``p_t`` is the teacher's softmax at temperature T over its top-k logits ``teacher_topk_values`` [n, k] placed
    at classes ``teacher_topk_indices`` [n, k] (zero elsewhere); the student's softmax is over all C classes, so
    the KL is exact for that distribution and k = C is standard full-softmax KD. ``alpha=0`` is plain cross
    entropy (the teacher may be None); ``alpha=1`` is pure KD (labels may be None). ``reduction``: mean, sum, none.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float16/bf16 logits: the loss in float32
    per_sample = torch.zeros(student_logits.shape[0], dtype=dtype, device=student_logits.device)
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels are needed when alpha < 1")
        per_sample = per_sample + (1.0 - alpha) * F.cross_entropy(student_logits, labels.long(), reduction="none")
    if alpha > 0.0:
        per_sample = per_sample + alpha * T * T * topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, T)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor | None, indices: torch.Tensor | None,
            T: float) -> torch.Tensor:
    """Per-sample KL(p_t || softmax(s / T)) with p_t supported on the teacher's top-k classes."""
    if values is None or indices is None:
        raise ValueError("teacher top-k values and indices are needed when alpha > 0")
    n, c = student_logits.shape
    if values.shape != indices.shape or values.ndim != 2 or values.shape[0] != n or values.shape[1] > c:
        raise ValueError(f"teacher top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must both "
                         f"be [n={n}, k<={c}]")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_pt = teacher_log_probs(values.to(student_logits.device), T).to(dtype)
    log_qs = F.log_softmax(student_logits.to(dtype) / T, dim=-1).gather(1, indices.to(student_logits.device).long())
    return (log_pt.exp() * (log_pt - log_qs)).sum(dim=-1)
