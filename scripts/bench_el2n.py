"""Benchmark: the EL2N proxy trainer (``metrics.el2n.train_proxy_heads``) against a bare torch loop that trains the
same number of linear heads for the same epochs over the same rows (Adam, same batch size), on seeded data.

    python scripts/bench_el2n.py                      # 1M x 512, 100 classes, 10 heads x 5 epochs (the target)
    python scripts/bench_el2n.py --quick              # seconds: a smoke run
Prints the seconds of each and the ratio ours / bare; the target is <= 2x, and <= 300 s for the default size.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench_common import report


def seeded_data(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    x = centres[y] * 0.3 + rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def bare_loop(x: np.ndarray, y: np.ndarray, classes: int, models: int, epochs: int, batch: int, lr: float,
              seed: int) -> float:
    """The plain way: one nn.Linear per head, trained one after another (the reference the proxy must match)."""
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    start = time.perf_counter()
    for m in range(models):
        torch.manual_seed(seed + m)
        head = torch.nn.Linear(x.shape[1], classes)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed + m)
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for b0 in range(0, len(xt), batch):
                idx = perm[b0:b0 + batch]
                loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="20k x 64, 10 classes, 2 heads x 1 epoch")
    p.add_argument("--skip-bare", action="store_true", help="time only ours (the bare loop at 1M rows runs for "
                   "tens of minutes on 2 cores; measure the ratio at a smaller --n)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.classes, args.models, args.epochs = 20_000, 64, 10, 2, 1
    import torch

    from datapruning.metrics.el2n import train_proxy_heads

    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = seeded_data(args.n, args.d, args.classes)
    train_proxy_heads(x[:512], y[:512], args.classes, 1, 1, 0, 0, 1e-2, args.batch_size)  # warm-up: torch.optim's
    bare_loop(x[:512], y[:512], args.classes, 1, 1, args.batch_size, 1e-2, 0)             # first import is slow
    start = time.perf_counter()
    train_proxy_heads(x, y, args.classes, args.models, args.epochs, 0, 0, 1e-2, args.batch_size)
    ours = time.perf_counter() - start
    bare = None if args.skip_bare else bare_loop(x, y, args.classes, args.models, args.epochs, args.batch_size, 1e-2, 0)
    out = {"quick": bool(args.quick), "n": args.n, "d": args.d, "classes": args.classes, "models": args.models, "epochs": args.epochs,
           "batch_size": args.batch_size, "threads": torch.get_num_threads(), "ours_s": round(ours, 2),
           "bare_s": None if bare is None else round(bare, 2), "ratio": None if bare is None else round(ours / bare, 3),
           "load_avg": [round(v, 2) for v in os.getloadavg()]}
    versus = "bare loop skipped" if bare is None else f"bare torch loop {bare:.1f} s, ratio {ours / bare:.2f}x (target <= 2x)"
    print(f"el2n proxy: {args.models} heads x {args.epochs} epochs over {args.n} x {args.d}, {args.classes} classes: "
          f"ours {ours:.1f} s ({ours / 60:.1f} min), {versus}; load average {os.getloadavg()[0]:.2f}", flush=True)
    report("bench_el2n", out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
