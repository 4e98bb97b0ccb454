"""Reference trainer: a classifier on a run's kept data, with or without KD from cached teacher outputs.

Copy it into your own trainer. The data comes from datapruning.consumers.loaders, the loss from datapruning.consumers.kd, and the
teacher's logits were computed once by `datapruning teacher`: this script never runs a teacher.

    datapruning train runs/demo/run --model head              # MLP head on the stored embeddings (CPU, seconds)
    datapruning train runs/demo/run --model head --kd         # + KD, alpha from the kept fraction
    datapruning train runs/demo/run --model cnn --epochs 5    # small CNN on the images, read from the shards

A teacher trained on the full data, made with this script and cached for KD:

    datapruning train runs/demo/run --model head --select all --save-logits runs/demo/full_logits.parquet
    datapruning teacher runs/demo/run --source logits --logits runs/demo/full_logits.parquet

Held out for accuracy: the samples whose ``split`` is val/validation/test when the manifest has such, else a
stable hash share (--holdout) of all samples, kept or not; training uses the selected samples minus those.
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..consumers.kd import alpha_schedule, kd_loss, teacher_batch
from ..consumers.loaders import ManifestDataset, load_embeddings, load_teacher, read_manifest, teacher_info
from ..embed import decode_input
from ..errors import InputError, RunNotReady, run_command
from ..io.files import write_json, write_parquet

HOLDOUT_SPLITS = ("val", "validation", "test")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# ---------------------------------------------------------------- which samples, which classes
def split_uids(run_dir: str, select: str, holdout: float):
    """(train uids, held-out uids, kept fraction, label by uid, samples not held out) from the manifest."""
    man = read_manifest(run_dir)
    uids, keep = man["uid"].to_pylist(), man["keep"].to_numpy(zero_copy_only=False).astype(bool)
    if "label" not in man.column_names:
        raise RunNotReady(f"{run_dir}: the manifest has no labels; the reference trainer needs them")
    splits = man["split"].to_pylist() if "split" in man.column_names else []
    if set(splits) & set(HOLDOUT_SPLITS):
        held = np.isin(np.asarray(splits, dtype=object), HOLDOUT_SPLITS)
    else:  # a stable share of all samples, by uid hash: the same samples whatever was kept
        held = np.array([zlib.crc32(u.encode()) % 10_000 < holdout * 10_000 for u in uids], dtype=bool)
    chosen = keep if select == "kept" else np.ones(len(uids), bool)
    if not (chosen & ~held).any():
        how = "by their split column" if set(splits) & set(HOLDOUT_SPLITS) else f"by --holdout {holdout}"
        raise InputError(f"{run_dir}: no {select} sample is left to train on: all {int(chosen.sum())} are held out "
                         f"({how}); lower --holdout, or give training rows a split other than val/validation/test")
    uid_arr = np.asarray(uids, dtype=object)
    labels = dict(zip(uids, man["label"].to_pylist()))
    return uid_arr[chosen & ~held].tolist(), uid_arr[held].tolist(), float(keep.mean()), labels, int((~held).sum())


def label_space(labels: list, classes: list[str]) -> tuple[list[str] | None, int]:
    """(class names or None, number of classes). Integer labels are the class index; string labels are looked up
    in ``classes`` (the teacher's, so that student and teacher agree), else in their sorted set."""
    if any(v is None for v in labels):
        raise InputError("some samples have no label; the reference trainer needs labels")
    if all(isinstance(v, int) for v in labels):
        return None, max(max(labels, default=-1) + 1, len(classes))
    names = list(classes) or sorted({str(v) for v in labels})
    unknown = sorted({str(v) for v in labels} - set(names))
    if unknown:
        raise InputError(f"label {unknown[0]!r} is not one of the classes {names[:10]}")
    return names, len(names)


def encode(labels: list, names: list[str] | None) -> np.ndarray:
    if names is None:
        return np.asarray(labels, dtype=np.int64)
    pos = {n: i for i, n in enumerate(names)}
    return np.asarray([pos[str(v)] for v in labels], dtype=np.int64)


# ---------------------------------------------------------------- models
def head_model(dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, num_classes))


def small_cnn(num_classes: int) -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


# ---------------------------------------------------------------- data: (x, y, teacher values, teacher indices)
def embedding_batches(run_dir, uids, names, kd, batch_size, seed, shuffle):
    data = load_embeddings(run_dir, select=uids)
    x, y = torch.from_numpy(data["embedding"]), torch.from_numpy(encode(data["label"], names))
    if kd:  # full logits, or top-k values, indices and tail
        teacher = [torch.from_numpy(a) for a in load_teacher(run_dir, data["uid"].tolist()).values()]
    else:
        teacher = [torch.zeros(len(y), 1)]
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, *teacher), batch_size, shuffle=shuffle,
                                       generator=gen)


class ImageSample:
    """webdataset sample -> (image tensor [3, s, s] in [-0.5, 0.5], class, *teacher tensors)."""

    def __init__(self, names, size):
        self.names, self.size = names, size

    def __call__(self, sample):
        image = decode_input(sample, "image", IMAGE_KEYS, ()).resize((self.size, self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 - 0.5).permute(2, 0, 1)
        y = int(encode([sample["label"]], self.names)[0])
        teacher = [torch.from_numpy(np.asarray(v)) for k, v in sample.items() if k.startswith("teacher_")]
        return (x, y, *(teacher or [torch.zeros(1)]))


def image_batches(run_dir, uids, names, kd, batch_size, seed, workers, size):
    data = ManifestDataset(run_dir, select=uids, columns=("label",), teacher=kd, shuffle_shards=True, seed=seed,
                           transform=ImageSample(names, size))
    return torch.utils.data.DataLoader(data, batch_size, num_workers=workers)


# ---------------------------------------------------------------- training
BASE_EPOCHS = 20  # auto: the samples seen equal this many epochs of every training sample (kept or not) ...
KD_STEPS = 2  # ... times this with KD


def auto_epochs(n_train: int, n_all: int, kd: bool) -> int:
    """Epochs over ``n_train`` samples that see as many samples as BASE_EPOCHS epochs of ``n_all`` (x KD_STEPS
    with KD): a pruned set gets the full set's training budget, not a fraction of it."""
    return max(1, math.ceil(BASE_EPOCHS * (KD_STEPS if kd else 1) * n_all / max(n_train, 1)))


def accuracy(model, batches) -> float | None:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y, *_ in batches:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total if total else None


def fit(model, train, held, epochs, lr, alpha, T, kd) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for epoch in range(1, epochs + 1):
        if hasattr(train.dataset, "set_epoch"):
            train.dataset.set_epoch(epoch)
        model.train()
        total = n = 0.0
        for x, y, *teacher in train:  # alpha=0 is plain cross entropy
            loss = kd_loss(model(x), y, teacher_batch(*teacher) if kd else None, alpha if kd else 0.0, T)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        acc = accuracy(model, held) if held is not None else None
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "heldout_acc": acc, "samples": int(n)})
        print(f"epoch {epoch}: train loss {total / max(n, 1):.4f}, held-out acc "
              f"{'n/a' if acc is None else f'{acc:.3f}'} ({int(n)} train samples)", flush=True)
    return history


def save_logits(model, args, names, path) -> None:
    """Logits of every manifest sample, as a teacher for `datapruning teacher --source logits`."""
    model.eval()
    uids, rows = [], []
    with torch.no_grad():
        if args.model == "head":
            data = load_embeddings(args.run_dir, select="all")
            uids, rows = data["uid"].tolist(), [model(torch.from_numpy(data["embedding"])).numpy()]
        else:
            for sample in ManifestDataset(args.run_dir, select="all", columns=("label",)):
                uids.append(sample["uid"])
                rows.append(model(ImageSample(names, args.image_size)(sample)[0][None]).numpy())
    logits = np.concatenate(rows).astype(np.float32)
    write_parquet(path, pa.table({"uid": uids, "logits": pa.array(list(logits), pa.list_(pa.float32()))}))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="datapruning train", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--model", choices=("head", "cnn"), default="head")
    p.add_argument("--select", choices=("kept", "all"), default="kept", help="train on the kept or all samples")
    p.add_argument("--kd", action="store_true", help="distil from the cached teacher outputs (datapruning teacher)")
    p.add_argument("--alpha", default="auto", help="KD weight, or 'auto': datapruning.consumers.kd.alpha_schedule(kept fraction)")
    p.add_argument("--T", type=float, default=4.0, help="KD temperature")
    p.add_argument("--epochs", default="auto", help=f"passes over the training samples, or auto (the default): "
                   f"as many samples as {BASE_EPOCHS} epochs of all of them, so a kept fraction f trains {BASE_EPOCHS}/f "
                   f"epochs, and {KD_STEPS}x that with --kd (a student learns more from each soft target, and longer)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (head), 3e-3 (cnn)")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (cnn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", help="write the per-epoch history here (json)")
    p.add_argument("--save-logits", help="after training, write every sample's logits (parquet) for use as a teacher")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    train_uids, held_uids, kept_fraction, labels, n_all = split_uids(args.run_dir, args.select, args.holdout)
    epochs = auto_epochs(len(train_uids), n_all, args.kd) if args.epochs == "auto" else int(args.epochs)
    info = teacher_info(args.run_dir) if args.kd else {"classes": [], "num_classes": 0}
    names, c = label_space(list(labels.values()), info["classes"])
    if args.kd:  # the student predicts the teacher's classes
        if c > info["num_classes"]:
            raise InputError(f"the labels need {c} classes but the teacher has {info['num_classes']}")
        c = info["num_classes"]
    auto = alpha_schedule(kept_fraction if args.select == "kept" else 1.0)  # the default, documented in kd.py
    alpha = auto if args.alpha == "auto" else float(args.alpha)
    if args.model == "head":
        train = embedding_batches(args.run_dir, train_uids, names, args.kd, args.batch_size, args.seed, True)
        held = embedding_batches(args.run_dir, held_uids, names, False, 1024, args.seed, False) if held_uids else None
        model = head_model(train.dataset.tensors[0].shape[1], c)
    else:
        train = image_batches(args.run_dir, train_uids, names, args.kd, args.batch_size, args.seed, args.workers,
                              args.image_size)
        held = image_batches(args.run_dir, held_uids, names, False, 256, args.seed, args.workers,
                             args.image_size) if held_uids else None
        model = small_cnn(c)
    print(f"training {args.model} on {len(train_uids)} samples ({args.select}; kept fraction {kept_fraction:.2f}), "
          f"{len(held_uids)} held out; {epochs} epochs; " + (f"KD alpha={alpha:.2f} T={args.T}" if args.kd else "no KD"),
          flush=True)
    lr = args.lr or (1e-2 if args.model == "head" else 3e-3)
    history = fit(model, train, held, epochs, lr, alpha, args.T, args.kd)
    if args.metrics:
        write_json(args.metrics, {"args": vars(args), "epochs": epochs, "alpha": alpha if args.kd else None,
                                  "history": history})
    if args.save_logits:
        save_logits(model, args, names, args.save_logits)
    return history


def command(argv=None) -> int:
    """``main`` for a shell: 0, or 2 and a one-line message for an error raised on purpose."""
    def run() -> int:
        main(argv)
        return 0

    return run_command("datapruning train", run)


if __name__ == "__main__":
    sys.exit(command())
