"""EL2N (Paul, Ganguli, Dziugaite, NeurIPS 2021): from user logits or from cheap proxy heads.

See docs/methods.md#el2n-error-l2-norm-scores.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
from tqdm.auto import tqdm
from ..errors import ConfigError, InputError


log = logging.getLogger(__name__)

BLOCK_BYTES = 32 << 20  # float64 logits per block of rows (scoring) or of heads (training): memory flat in N and C
ADAM = (0.9, 0.999, 1e-8)  # torch.optim.Adam's defaults: betas, eps
SMALL_STEP_MACS = 1 << 24  # below this many multiply-adds per step, extra torch threads only add sync cost


@contextmanager
def torch_threads_for(step_macs: int):
    """Run small training steps on one torch thread (restored afterwards); big steps keep the default. The
    thread count never changes a result: the models train in float64, with no flush of denormals
    (torch flushes only on the calling thread, so flushing would make the result depend on the thread count)."""
    import torch

    before = torch.get_num_threads()
    if step_macs < SMALL_STEP_MACS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored_score(scores: np.ndarray) -> np.ndarray:
    """A score computed in float64, rounded once to float32 precision (24 significant bits) and returned as
    float64: sums in another order (another thread count, BLAS build or CPU kernel) move a float64 result by
    about 1e-16 relative, which changes the rounded value only when it lies that close to a float32 rounding
    midpoint (a few scores in 10**9). See docs/methods.md#same-data-same-answer."""
    return np.asarray(scores, dtype=np.float64).astype(np.float32).astype(np.float64)


def label_codes(labels: np.ndarray) -> np.ndarray:
    """Class values -> int64 codes 0..C-1 in sorted order (``{3, 17, 999}`` -> ``{0, 1, 2}``; strings too), so a
    model's size and its scores do not depend on the values. Negative integers (unlabelled) are refused."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and len(labels) and labels.min() < 0:
        raise ConfigError("el2n: labels must be >= 0; drop unlabelled rows first")
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _check_labels(labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise InputError(f"el2n: {labels.shape} labels for {n} samples")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConfigError(f"el2n: labels must be in [0, {n_classes}); drop unlabelled rows first")
    return labels


def _el2n_block(out: np.ndarray, labels: np.ndarray, from_logits: bool) -> np.ndarray:
    """EL2N of one row block: ``out`` [M, b, C] -> float64 [b], via ``||p - e_y||^2 = ||p||^2 - 2 p_y + 1``."""
    out = np.asarray(out, dtype=np.float64)
    if from_logits:
        p = np.exp(out - out.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
    else:
        p = out
    p_y = np.take_along_axis(p, labels[None, :, None], axis=2)[..., 0]
    sq = np.einsum("mbc,mbc->mb", p, p) - 2.0 * p_y + 1.0
    return stored_score(np.sqrt(np.maximum(sq, 0.0)).mean(axis=0))


def el2n(outputs: np.ndarray, labels: np.ndarray, from_logits: bool = True) -> np.ndarray:
    """``EL2N(x, y) = mean_m || softmax(f_m(x)) - onehot(y) ||_2``, float64 [n] at float32 precision.

    ``outputs``: logits (or probabilities with ``from_logits=False``) [M, n, C], or [n, C] for one
    model; a ``np.memmap`` is read in row blocks. ``labels``: int [n] in [0, C)."""
    if not hasattr(outputs, "shape"):
        outputs = np.asarray(outputs)
    if outputs.ndim == 2:
        outputs = outputs[None]
    if outputs.ndim != 3 or outputs.shape[0] == 0 or outputs.shape[2] == 0:
        raise ConfigError(f"el2n: outputs must be [M, n, C] or [n, C], got {outputs.shape}")
    m, n, c = outputs.shape
    labels = _check_labels(labels, n, c)
    scores = np.empty(n, dtype=np.float64)
    step = max(1, BLOCK_BYTES // (8 * m * c))
    for r0 in range(0, n, step):
        scores[r0:r0 + step] = _el2n_block(outputs[:, r0:r0 + step], labels[r0:r0 + step], from_logits)
    return scores


def _head_params(n_models: int, d: int, n_classes: int, hidden: int, seed: int):
    """Per-head weights stacked on a leading model axis; head m is initialised from seed (seed, m). Each head is
    drawn into its slice of the stacked tensors (no second copy of the weights)."""
    import torch

    dims = [d, n_classes] if hidden == 0 else [d, hidden, n_classes]
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        params += [torch.empty(n_models, fan_in, fan_out, dtype=torch.float64),
                   torch.empty(n_models, 1, fan_out, dtype=torch.float64)]
    for m in range(n_models):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), m]).generate_state(1)[0]))
        for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = 1.0 / np.sqrt(fan_in)  # nn.Linear's default uniform init
            params[2 * layer][m] = (torch.rand(fan_in, fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            params[2 * layer + 1][m] = (torch.rand(1, fan_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return params


def _forward(params, x):
    """x [M, b, d] -> logits [M, b, C] through M independent heads (linear, or one ReLU hidden layer)."""
    import torch

    h = x
    for layer in range(0, len(params), 2):
        h = torch.baddbmm(params[layer + 1], h, params[layer])
        if layer + 2 < len(params):
            h = torch.relu(h)
    return h


def _adam_step(p, grad, exp_avg, exp_avg_sq, step: int, lr: float) -> None:
    """One step of ``torch.optim.Adam`` with its defaults on CPU (the single-tensor path), op for op, so the same
    bits; applied to one group of heads at a time, it never needs every head's gradient (or the optimizer module,
    whose import alone costs about 150 MiB of RSS)."""
    beta1, beta2, eps = ADAM
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** float(step))
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** float(step)) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def heads_per_group(n_models: int, rows: int, width: int) -> int:
    """Heads trained together in one step: their float64 activations (rows x width each) within ``BLOCK_BYTES``,
    at least one head. Heads are independent, so the grouping never changes a weight."""
    return max(1, min(int(n_models), BLOCK_BYTES // max(8 * int(rows) * int(width), 1)))


def _train_step(params, moments, x, y, idx, step: int, lr: float, group: int) -> None:
    """One minibatch step of every head, ``group`` heads at a time: forward, the gradient of the group's summed
    per-head mean cross-entropy, then Adam on the group's slice of the stacked weights (in place)."""
    import torch

    n_models = params[0].shape[0]
    for g0 in range(0, n_models, group):
        g1 = min(n_models, g0 + group)
        views = [p[g0:g1] for p in params]
        leaves = [v.detach().requires_grad_(True) for v in views]
        logits = _forward(leaves, x[idx[g0:g1]].double())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[2]), y[idx[g0:g1]].reshape(-1))
        grads = torch.autograd.grad(loss * (g1 - g0), leaves)  # each head's gradient is its own mean loss's
        del logits, loss
        with torch.no_grad():
            for v, g, (m1, m2) in zip(views, grads, moments):
                _adam_step(v, g, m1[g0:g1], m2[g0:g1], step, lr)


def train_proxy_heads(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, n_models: int = 10,
                      epochs: int = 5, hidden: int = 0, seed: int = 0, lr: float = 1e-2,
                      batch_size: int = 256) -> list[np.ndarray]:
    """Train ``n_models`` independently seeded heads (linear, or a ``hidden``-unit MLP) on the embeddings
    for ``epochs`` epochs (Adam, torch CPU, float64; each head has its own init and batch order, drawn over
    the rows in the order given: the pipeline gives them in uid-hash order). ``labels`` are codes in
    [0, n_classes). Returns the stacked float64 weights (``proxy_el2n`` scores with them). Memory: the
    weights and Adam's two moments (3 x 8 x n_models x (d + 1) x C bytes for linear heads) plus one group of
    heads' activations (``heads_per_group``), whatever the number of rows."""
    import torch

    x_np = np.asarray(embeddings, dtype=np.float32)
    if x_np.ndim != 2 or n_models < 1 or epochs < 0 or hidden < 0:
        raise InputError("el2n_proxy: need 2-D embeddings, n_models >= 1, epochs >= 0, hidden >= 0")
    n_classes = max(int(n_classes), 1)
    labels = _check_labels(labels, len(x_np), n_classes)
    if n_classes == 1:
        log.warning("el2n_proxy: one class only; every EL2N score is 0")
    x, y = torch.from_numpy(x_np), torch.from_numpy(labels)  # float32 rows, widened one batch at a time
    params = _head_params(int(n_models), x.shape[1], n_classes, int(hidden), seed)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    gen = torch.Generator().manual_seed(int(seed))
    n, step = len(x), 0
    width = n_classes if hidden == 0 else hidden + n_classes
    group = heads_per_group(n_models, min(int(batch_size), n), width)
    with torch_threads_for(n_models * int(batch_size) * x.shape[1] * width):
        for _ in tqdm(range(int(epochs)), desc="el2n proxy heads", unit="epoch", disable=n * epochs < 1_000_000):
            perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(n_models)])  # [M, n]
            for b0 in range(0, n, int(batch_size)):
                step += 1
                _train_step(params, moments, x, y, perms[:, b0:b0 + int(batch_size)], step, lr, group)
    return [p.numpy() for p in params]


def proxy_el2n(heads: list[np.ndarray], embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N of each row under the trained ``heads`` (from ``train_proxy_heads``); labels in [0, C).
    Float64 throughout, the score rounded once to float32 precision (``stored_score``)."""
    import torch

    params = [torch.from_numpy(np.asarray(h, dtype=np.float64)) for h in heads]
    n_models, n_classes = params[0].shape[0], params[-1].shape[-1]
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    labels = _check_labels(labels, len(x), n_classes)
    scores = np.empty(len(x), dtype=np.float64)
    step = max(1, BLOCK_BYTES // (8 * n_models * max(n_classes, params[0].shape[-1], 1)))
    with torch.no_grad():
        for r0 in range(0, len(x), step):
            xb = x[r0:r0 + step].double().expand(n_models, -1, -1)
            scores[r0:r0 + step] = _el2n_block(_forward(params, xb).numpy(), labels[r0:r0 + step], True)
    return scores


def el2n_proxy(embeddings: np.ndarray, labels: np.ndarray, n_models: int = 10, epochs: int = 5,
               hidden: int = 0, seed: int = 0, lr: float = 1e-2, batch_size: int = 256) -> np.ndarray:
    """Proxy EL2N: train ``n_models`` seeded heads on the embeddings (``train_proxy_heads``), then score
    every row with ``el2n``. ``labels``: any class values (non-negative integers, or strings); the heads see
    them as codes 0..C-1 in sorted order (``label_codes``), so relabelling the classes in the same order
    gives the same scores. The heads run batched."""
    codes = label_codes(labels)
    n_classes = int(codes.max(initial=-1)) + 1
    heads = train_proxy_heads(embeddings, codes, n_classes, n_models, epochs, hidden, seed, lr, batch_size)
    return proxy_el2n(heads, embeddings, codes)
