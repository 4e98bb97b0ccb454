"""The linear probe behind the pruning curves: a seeded stratified hold-out and a deterministic probe accuracy."""
from __future__ import annotations

import warnings

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified hold-out: ``round(test_fraction * n_c)`` rows of every class c with at least
    two rows go to the test side (so every such class keeps a training row). Returns the test mask."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"eval: test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(int(round(test_fraction * len(rows))), len(rows) - 1)
        test[rows[:max(n_test, 0)]] = True
    return test


def probe_accuracy(x_train, y_train, x_test, y_test, max_iter: int = 200, C: float = 1.0) -> float:
    """Multinomial logistic regression (lbfgs, fixed ``max_iter``: deterministic) on standardised
    features; accuracy on the test rows. One training class predicts that class; none scores 0."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y_test = np.asarray(y_test)
    classes = np.unique(y_train)
    if len(classes) == 0 or len(y_test) == 0:
        return 0.0
    if len(classes) == 1:
        return float(np.mean(y_test == classes[0]))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fixed budget on purpose: same fit every time
        clf.fit((x_train - mean) / std, y_train)
    return float(np.mean(clf.predict((x_test - mean) / std) == y_test))
