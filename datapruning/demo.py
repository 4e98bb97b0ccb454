"""The offline demo: the full pipeline on scikit-learn's digits, with a SimCLR encoder trained on them.

The digits are written as PNG webdataset shards. Runs in about a minute on 2 CPU cores."""
from __future__ import annotations

import io
import logging
import tarfile
import time
from pathlib import Path

import numpy as np

from .config import load_config
from .errors import require
from .io.files import atomic_path

log = logging.getLogger(__name__)

N_SHARDS = 4
DEMO_CONFIG = {
    "seed": 0,
    "embed": {"encoder": "torch_module", "module": "datapruning.demo:DigitEncoder", "modality": "image",
              "batch_size": 256, "device": "cpu"},
    "cluster": {"k": 10, "niter": 50},
    "score": {"metrics": ["ssp", "random", "el2n", "dbp", "semdedup"]},
    "select": {"method": "rank", "metric": "ssp", "mode": "hard", "keep_fraction": 0.5, "min_per_cluster": 0.2},
}


def _torch():
    import torch

    return torch


class DigitEncoder(_torch().nn.Module):
    """A small CNN for 16x16 grey digits -> 64-d features (the SimCLR projection head is not part of it)."""

    def __init__(self, dim: int = 64):
        nn = _torch().nn
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, dim))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def transform(image):
        """PIL image -> [1, 16, 16] float tensor in [-1, 1]."""
        arr = np.asarray(image.convert("L").resize((16, 16)), dtype=np.float32) / 127.5 - 1.0
        return _torch().from_numpy(arr)[None]


def stored_image(digit: np.ndarray):
    """An 8x8 digit scan (0..16) as the 32x32 PNG image the demo shards hold (nearest upscaling)."""
    from PIL import Image

    return Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST)


def write_digit_shards(folder: Path) -> list[Path]:
    """scikit-learn's digits (1,797 real 8x8 scans) as PNG webdataset shards with a ``cls`` label."""
    digits = require("sklearn.datasets", "demo", "the demo").load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, rows in enumerate(np.array_split(np.arange(len(digits.images)), N_SHARDS)):
        path = folder / f"digits-{s:05d}.tar"
        paths.append(path)
        if path.exists():
            continue
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in rows:
                img = stored_image(digits.images[i])
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(digits.target[i]).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return paths


def _augment(x, gen):
    """Random affine (shift, rotation, scale) plus noise: the two SimCLR views."""
    torch = _torch()
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * 0.5
    scale = 0.85 + torch.rand(n, generator=gen) * 0.3
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.4
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return out + 0.1 * torch.randn(out.shape, generator=gen)


def train_encoder(images: np.ndarray, path: Path, epochs: int = 30, seed: int = 0) -> dict:
    """SimCLR (NT-Xent, temperature 0.2) on the digits alone; no labels are used. Saves safetensors."""
    torch = _torch()
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    model = DigitEncoder()
    head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 64))
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=2e-3)
    start, losses = time.perf_counter(), []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for b in range(0, len(x), 256):
            batch = x[perm[b:b + 256]]
            z = torch.nn.functional.normalize(head(model(torch.cat([_augment(batch, gen), _augment(batch, gen)]))), dim=1)
            sim = z @ z.T / 0.2
            sim.fill_diagonal_(-1e9)
            m = len(batch)
            target = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
            loss = torch.nn.functional.cross_entropy(sim, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * m
        losses.append(total / len(x))
    with atomic_path(path) as tmp:
        save_file(model.state_dict(), str(tmp))
    return {"epochs": epochs, "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3),
            "seconds": round(time.perf_counter() - start, 1)}


def run_demo(output: str | Path, overrides=()) -> dict:
    """Build the digits shards, train the encoder (once), run the pipeline, print a summary."""
    load_digits = require("sklearn.datasets", "demo", "the demo").load_digits
    normalized_mutual_info_score = require("sklearn.metrics", "demo", "the demo").normalized_mutual_info_score

    from .run import RunLayout
    from .runner import run_pipeline

    output = Path(output)
    shards = write_digit_shards(output / "data")
    weights = output / "encoder" / "digits_simclr.safetensors"
    if not weights.exists():
        # the encoder trains on exactly what it embeds: the stored images through DigitEncoder.transform
        images = np.stack([DigitEncoder.transform(stored_image(im))[0].numpy() for im in load_digits().images])
        log.info("demo: training the self-supervised digit encoder (SimCLR, no labels)")
        info = train_encoder(images, weights)
        log.info("demo: encoder trained: %s", info)
    base = {**DEMO_CONFIG, "embed": {**DEMO_CONFIG["embed"], "weights": str(weights)}}
    cfg = load_config(None, list(overrides), base=base)
    run = RunLayout(output / "run")
    stats = run_pipeline(cfg, [str(p) for p in shards], run.root)
    import pyarrow.parquet as pq

    manifest = pq.read_table(run.dir("manifest"))
    nmi = normalized_mutual_info_score(manifest["label"].to_numpy(), manifest["cluster"].to_numpy())
    lines = [
        f"datapruning demo: {stats['samples_in']} real digit images (scikit-learn) in {len(shards)} webdataset shards",
        f"  encoder   {stats['encoder']} (SimCLR, trained on the digits themselves, no labels)",
        f"  clusters  k={stats['clusters']['k']}; agreement with the true digit labels NMI={nmi:.2f}",
        f"  kept      {stats['kept']} of {stats['samples_in']} ({stats['kept_fraction']:.0%}), "
        f"metric {cfg.select.metric}, mode {cfg.select.mode}",
        f"  manifest  {stats['manifest']}",
        f"  kept list {stats['kept_list']}",
        f"  stats     {run.stats}",
    ]
    from .evaluation.curves import run_eval
    from .evaluation.report import build_report

    evaluation = run_eval(run.root)  # pruning curves: which metric and fraction suit these digits
    report = build_report(run.root)
    lines += [f"  curves    {run.curves_png}",
              f"  {evaluation['summary']['line']}",
              f"  report    {report.resolve()}  (open it in a browser)"]
    print("\n".join(lines))
    return {**stats, "nmi": nmi, "eval": evaluation["summary"], "report": str(report)}
