"""The linear probe behind the pruning curves: softmax regression in torch, trained to convergence.

Full-batch L-BFGS; its L2 strength is chosen by validation on the kept training rows; optional KD from a
teacher's logits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from ..errors import ConfigError

L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5)  # mean cross entropy + l2/2 * ||W||^2, on standardised features


@dataclass(frozen=True)
class ProbeSettings:
    """How every probe of an eval is trained (the same for every curve, with and without KD)."""

    l2_grid: tuple = L2_GRID  # tried from strongest to weakest, each warm-started from the previous
    val_fraction: float = 0.2  # of the kept rows, stratified, to choose l2; then refit on all kept rows
    max_iter: int = 300  # L-BFGS iterations per fit (a cap; fits stop at ``tol``)
    tol: float = 1e-4  # max |gradient| at convergence
    seed: int = 0
    threads: int = 1  # torch threads while fitting (0: torch's setting); small fits gain nothing from more

    def __post_init__(self):
        import math

        grid_ok = bool(self.l2_grid) and all(math.isfinite(v) and v >= 0 for v in self.l2_grid)
        for flag, value, ok, want in (("--l2", self.l2_grid, grid_ok, "finite numbers >= 0"),
                                      ("--max-iter", self.max_iter, self.max_iter >= 1, ">= 1"),
                                      ("--threads", self.threads, self.threads >= 0, ">= 0 (0: torch's default)"),
                                      ("val_fraction", self.val_fraction, 0.0 < self.val_fraction < 1.0, "in (0, 1)"),
                                      ("tol", self.tol, math.isfinite(self.tol) and self.tol > 0, "finite and > 0")):
            if not ok:
                raise ConfigError(f"eval: {flag} must be {want}, got {value!r}")

    def as_dict(self) -> dict:
        return {**asdict(self), "model": "softmax regression (torch, L-BFGS, strong Wolfe)",
                "features": "standardised by the training rows' mean and std"}


@dataclass(frozen=True)
class Teacher:
    """KD for a probe: the teacher's logits for the rows being fitted, weight ``alpha`` and temperature ``T``."""

    logits: np.ndarray
    alpha: float
    T: float


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified hold-out: ``round(test_fraction * n_c)`` rows of every class c with at least
    two rows go to the test side (so every such class keeps a training row). Returns the test mask."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"eval: test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(round(test_fraction * len(rows))), len(rows) - 1)
        test[rows[:max(n_test, 0)]] = True
    return test


def _linear():
    """``addmm(b, x, W)`` whose backward computes ``dW`` as ``(g^T x)^T``: the same sums as autograd's
    ``x^T g``, but without a GEMM over the transposed (strided) x, which runs 2-3x slower on CPU."""
    import torch

    global _LINEAR
    if _LINEAR is None:
        class Linear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, W, b):
                ctx.save_for_backward(x)
                return torch.addmm(b, x, W)

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return None, torch.mm(g.t(), x).t().contiguous(), g.sum(0)

        _LINEAR = Linear
    return _LINEAR


_LINEAR = None


def _loss(W, b, x, y, l2: float, soft, alpha: float, T: float):
    import torch
    import torch.nn.functional as F

    logits = _linear().apply(x, W, b)
    loss = F.cross_entropy(logits, y) if alpha < 1.0 else logits.new_zeros(())
    if soft is not None and alpha > 0.0:  # Hinton: (1 - a) CE + a T^2 KL(p_t || softmax(s / T)), teacher fixed
        kl = (soft * (torch.log(soft.clamp_min(1e-30)) - F.log_softmax(logits / T, dim=1))).sum(1).mean()
        loss = (1.0 - alpha) * loss + alpha * T * T * kl
    return loss + 0.5 * l2 * (W * W).sum()


def _lbfgs(W, b, x, y, l2, soft, alpha, T, max_iter, tol) -> int:
    import torch

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(W, b, x, y, l2, soft, alpha, T)
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))


class Probe:
    """A fitted probe: ``predict(x)`` (class codes) and ``logits(x)`` on standardised features."""

    def __init__(self, W: np.ndarray, b: np.ndarray, classes: np.ndarray, info: dict):
        self.W, self.b, self.classes, self.info = W, b, classes, info

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), int(self.classes.max(initial=-1)) + 1), -np.inf, dtype=np.float32)
        out[:, self.classes] = x @ self.W + self.b
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(self.classes) == 0:  # nothing kept: every prediction is wrong
            return np.full(len(x), -1)
        if len(self.classes) == 1:
            return np.full(len(x), self.classes[0])
        return self.classes[np.argmax(x @ self.W + self.b, axis=1)]


def fit_probe(x: np.ndarray, y: np.ndarray, settings: ProbeSettings, teacher: Teacher | None = None) -> Probe:
    """Softmax regression on (x, y) (x already standardised): l2 chosen on a seeded stratified validation
    split of these rows (accuracy against the true labels, ties to the stronger l2), then a refit on every
    row. Deterministic for ``settings.seed``. With a ``teacher``, every fit distils from its logits."""
    import torch

    y = np.asarray(y)
    classes = np.unique(y)
    if len(classes) < 2:
        return Probe(np.zeros((x.shape[1], 1), np.float32), np.zeros(1, np.float32), classes,
                     {"l2": None, "iters": 0})
    before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            return _fit(x, np.searchsorted(classes, y), classes, settings, teacher)
    finally:
        torch.set_num_threads(before)


def _fit(x, codes, classes, s: ProbeSettings, teacher: Teacher | None) -> Probe:
    import torch

    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(codes.astype(np.int64))
    soft, alpha, T = None, 0.0, 1.0
    if teacher is not None and teacher.alpha > 0:
        t = torch.from_numpy(np.asarray(teacher.logits, np.float32)[:, classes])
        soft, alpha, T = torch.softmax(t / teacher.T, dim=1), float(teacher.alpha), float(teacher.T)
    W = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    grid = sorted(s.l2_grid, reverse=True)
    iters, scores = 0, []
    val = stratified_split(codes, s.val_fraction, s.seed) if len(grid) > 1 and len(codes) >= 10 else None
    if val is not None and val.any() and (~val).any():
        tr, va = torch.from_numpy(np.flatnonzero(~val)), torch.from_numpy(np.flatnonzero(val))
        st = None if soft is None else soft[tr]
        states = []
        for l2 in grid:
            iters += _lbfgs(W, b, xt[tr], yt[tr], l2, st, alpha, T, s.max_iter, s.tol)
            with torch.no_grad():
                scores.append(float((torch.addmm(b, xt[va], W).argmax(1) == yt[va]).float().mean()))
                states.append((W.detach().clone(), b.detach().clone()))
                if scores[-1] < max(scores[:-1], default=-1.0):
                    break  # weaker l2 got worse on validation: the rest of the path is not tried
        best = int(np.argmax(scores))  # first maximum: the strongest l2 among the best
        l2 = grid[best]
        with torch.no_grad():
            W.copy_(states[best][0])
            b.copy_(states[best][1])
    else:
        l2 = grid[len(grid) // 2]
    n_final = _lbfgs(W, b, xt, yt, l2, soft, alpha, T, s.max_iter, s.tol)
    with torch.no_grad():
        grad_ok = _converged(W, b, xt, yt, l2, soft, alpha, T, s.tol)
    info = {"l2": l2, "iters": iters + n_final, "val_accuracy": dict(zip(map(str, grid), scores)),
            "converged": grad_ok}
    return Probe(W.detach().numpy().copy(), b.detach().numpy().copy(), classes, info)


def _converged(W, b, x, y, l2, soft, alpha, T, tol) -> bool:
    import torch

    with torch.enable_grad():
        W2, b2 = W.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        _loss(W2, b2, x, y, l2, soft, alpha, T).backward()
    return bool(max(W2.grad.abs().max(), b2.grad.abs().max()) <= 10 * tol)


def standardise(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every matrix standardised by the training rows' mean and std (float32)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    return [((m - mean) / std).astype(np.float32) for m in (x_train, *others)]


def probe_accuracy(x_train, y_train, x_test, y_test, settings: ProbeSettings | None = None) -> float:
    """Standardise, fit the probe on the training rows, and return its accuracy on the test rows (0 without any)."""
    y_test = np.asarray(y_test)
    if len(y_test) == 0 or len(y_train) == 0:
        return 0.0
    xs_train, xs_test = standardise(np.asarray(x_train, np.float32), np.asarray(x_test, np.float32))
    return float(np.mean(fit_probe(xs_train, y_train, settings or ProbeSettings()).predict(xs_test) == y_test))
