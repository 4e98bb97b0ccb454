"""The reference trainer (datapruning train) on a real tiny run: loss goes down, KD runs from cached outputs."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from datapruning.consumers import teacher as tm
from datapruning.consumers.kd import alpha_schedule
from conftest import make_tiny_run

TRAIN = Path(__file__).resolve().parent.parent / "pipelines" / "train.py"  # the top-level wrapper


def load_trainer():
    return importlib.import_module("datapruning.pipelines.train")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_config):
    """80 labelled PNG samples (3 classes) in 4 shards, tiny random-init open_clip, half kept."""
    root = tmp_path_factory.mktemp("train")
    return make_tiny_run(root, tiny_clip_config, n_shards=4, per_shard=20, seed=3)



def decreasing(history) -> bool:
    losses = [h["train_loss"] for h in history]
    return losses[-1] < losses[0] and all(h["samples"] == history[0]["samples"] for h in history)


def no_teacher_allowed(monkeypatch):
    """Any attempt to build or run a teacher fails the test: KD must come from the cached outputs."""
    import open_clip

    def boom(*a, **k):
        raise AssertionError("the trainer ran a teacher")

    monkeypatch.setattr(tm, "build_teacher", boom)
    monkeypatch.setattr(tm, "run_teacher", boom)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    monkeypatch.setattr(open_clip, "create_model", boom)


def test_head_without_kd(fresh, tmp_path):
    train = load_trainer()
    history = train.main([str(fresh), "--model", "head", "--epochs", "8", "--lr", "1e-2",
                          "--metrics", str(tmp_path / "m.json")])
    assert len(history) == 8 and decreasing(history)
    assert 0.0 <= history[-1]["heldout_acc"] <= 1.0
    stored = json.loads((tmp_path / "m.json").read_text())
    assert stored["history"] == history and stored["alpha"] is None
    assert 20 < history[0]["samples"] < 40  # the 40 kept samples minus the held-out share


def test_head_kd_from_a_teacher_trained_on_all_data(fresh, tmp_path, monkeypatch):
    train = load_trainer()
    logits = tmp_path / "full_logits.parquet"
    full = train.main([str(fresh), "--model", "head", "--select", "all", "--epochs", "10", "--lr", "1e-2",
                       "--save-logits", str(logits)])
    assert decreasing(full) and full[0]["samples"] > 40
    tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(logits), top_k=2))
    no_teacher_allowed(monkeypatch)
    kd = train.main([str(fresh), "--model", "head", "--kd", "--epochs", "8", "--lr", "1e-2",
                     "--metrics", str(tmp_path / "kd.json")])
    plain = train.main([str(fresh), "--model", "head", "--epochs", "8", "--lr", "1e-2"])
    assert decreasing(kd)
    assert [h["train_loss"] for h in kd] != [h["train_loss"] for h in plain]  # the KD term is in the loss
    assert json.loads((tmp_path / "kd.json").read_text())["alpha"] == pytest.approx(alpha_schedule(0.5))
    alpha0 = train.main([str(fresh), "--model", "head", "--kd", "--alpha", "0", "--epochs", "8", "--lr", "1e-2"])
    assert [h["train_loss"] for h in alpha0] == pytest.approx([h["train_loss"] for h in plain], rel=1e-6)


def test_cnn_on_images_with_kd_from_zero_shot_teacher(fresh, monkeypatch):
    tm.run_teacher(fresh, tm.TeacherConfig(classes=("0", "1", "2"), top_k=3))  # the run's tiny open_clip
    no_teacher_allowed(monkeypatch)
    train = load_trainer()
    history = train.main([str(fresh), "--model", "cnn", "--kd", "--alpha", "0.5", "--epochs", "4",
                          "--batch-size", "16", "--workers", "2"])
    assert decreasing(history) and history[0]["heldout_acc"] is not None


def test_kd_without_teacher_outputs_is_a_clear_error(fresh):
    with pytest.raises(FileNotFoundError, match="datapruning teacher"):
        load_trainer().main([str(fresh), "--kd", "--epochs", "1"])


def test_one_command(fresh):
    proc = subprocess.run([sys.executable, str(TRAIN), str(fresh), "--model", "head", "--epochs", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2: train loss" in proc.stdout and "held-out acc" in proc.stdout
