"""Teacher stage on a real run: zero-shot open_clip (tiny random-init), a user's module, supplied logits."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from datapruning.consumers import loaders as ld
from datapruning.consumers import teacher as tm
from datapruning.config import ConfigError
from datapruning.consumers.kd import TAIL_TEMPERATURES
from datapruning.run import RunLayout
from conftest import make_tiny_run

CLASSES = ("red", "green", "blue")
rng = np.random.default_rng(7)
W_EMB = rng.normal(size=(4, 16)).astype(np.float32)  # LinearTeacher's weights: 16-d embeddings -> 4 classes
B_EMB = rng.normal(size=4).astype(np.float32)


class LinearTeacher(nn.Module):
    """A user's teacher on the stored embeddings (loaded by import path 'test_teacher:LinearTeacher')."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


class ImageTeacher(nn.Module):
    """A user's teacher on images: defines transform(pil) -> tensor, so on=auto reads images."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    @staticmethod
    def transform(image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_config):
    root = tmp_path_factory.mktemp("teacher")
    return make_tiny_run(root, tiny_clip_config, n_shards=3, per_shard=8)



def stored(run_dir) -> tuple[list[str], np.ndarray, np.ndarray]:
    t = pq.read_table(run_dir / "teacher")
    k = t.schema.field("topk_values").type.list_size
    assert t.schema.field("topk_values").type.value_type == pa.float16()
    v = t["topk_values"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    i = t["topk_indices"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return t["uid"].to_pylist(), v.astype(np.float32), i


def kept_uids(run_dir) -> list[str]:
    return pq.read_table(run_dir / "kept.parquet")["uid"].to_pylist()


def check_topk(uids, values, indices, reference: dict[str, np.ndarray], atol: float) -> None:
    """Stored top-k = the reference's k largest logits minus the row max (float16 rounding; ties may swap)."""
    for u, v, i in zip(uids, values, indices):
        ref = reference[u] - reference[u].max()
        np.testing.assert_allclose(v, np.sort(ref)[::-1][:len(v)], atol=atol, rtol=1e-3)
        np.testing.assert_allclose(ref[i], v, atol=atol, rtol=1e-3)
        assert len(set(i.tolist())) == len(i) and np.all(np.diff(v) <= 0)


def open_clip_reference(run_dir, cfg_path, classes) -> dict[str, np.ndarray]:
    """Zero-shot logits computed here with open_clip directly: 100 * cos(image, prompt)."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(cfg_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # build_encoder seeds random-init weights the same way
        model, _, preprocess = open_clip.create_model_and_transforms(cfg_path.stem, pretrained=None)
    model.eval()
    tok = open_clip.get_tokenizer(cfg_path.stem)
    out = {}
    with torch.no_grad():
        text = model.encode_text(tok([f"a photo of a {c}." for c in classes]))
        text = text / text.norm(dim=-1, keepdim=True)
        for s in json.loads((run_dir / "shards.json").read_text())["shards"]:
            with tarfile.open(s["path"]) as tar:
                for m in tar:
                    if m.name.endswith(".png"):
                        img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                        f = model.encode_image(preprocess(img)[None])
                        f = f / f.norm(dim=-1, keepdim=True)
                        out[f"{s['name']}/{m.name[:-4]}"] = (100.0 * f @ text.T)[0].numpy()
    return out


def test_zero_shot_open_clip_on_embeddings_and_on_images(fresh, tiny_clip_config):
    ref = open_clip_reference(fresh, tiny_clip_config, CLASSES)
    cfg = tm.TeacherConfig(classes=CLASSES, top_k=2)  # model: the run's (tiny, random-init, allowed by the run)
    info = tm.run_teacher(fresh, cfg)
    assert info["on"] == "embeddings" and info["num_classes"] == 3 and info["top_k"] == 2 and info["rows"] == 12
    assert info["teacher"].startswith("zero_shot:open_clip:tiny-test-clip:RANDOM-INIT")
    uids, v, i = stored(fresh)
    assert sorted(uids) == sorted(kept_uids(fresh))
    check_topk(uids, v, i, ref, atol=0.1)
    tm.run_teacher(fresh, tm.TeacherConfig(classes=CLASSES, top_k=2, on="images"))
    uids2, v2, i2 = stored(fresh)
    assert uids2 == uids
    check_topk(uids2, v2, i2, ref, atol=0.1)


def test_module_teacher_on_embeddings_and_images(fresh, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "lin.safetensors"
    save_file({"fc.weight": torch.from_numpy(W_EMB), "fc.bias": torch.from_numpy(B_EMB)}, str(weights))
    info = tm.run_teacher(fresh, tm.TeacherConfig(source="module", module="test_teacher:LinearTeacher",
                                                  weights=str(weights), top_k=3))
    assert info["on"] == "embeddings" and info["num_classes"] == 4
    emb = pq.read_table(fresh / "embeddings")
    x = np.stack(emb["embedding"].to_numpy(zero_copy_only=False))
    ref = dict(zip(emb["uid"].to_pylist(), x @ W_EMB.T + B_EMB))
    uids, v, i = stored(fresh)
    check_topk(uids, v, i, ref, atol=2e-3)
    info = tm.run_teacher(fresh, tm.TeacherConfig(source="module", module="test_teacher:ImageTeacher",
                                                  allow_random_weights=True, top_k=2, samples="all"))
    assert info["on"] == "images" and info["num_classes"] == 5 and info["rows"] == 24
    with pytest.raises(ConfigError, match="teacher.weights"):
        tm.run_teacher(fresh, tm.TeacherConfig(source="module", module="test_teacher:ImageTeacher"))


def write_logits(path, uids, logits):
    pq.write_table(pa.table({"uid": uids, "logits": pa.array(list(logits), pa.list_(pa.float32()))}), path)


def test_supplied_logits_parquet_and_npy(fresh, tmp_path):
    all_uids = pq.read_table(fresh / "manifest")["uid"].to_pylist()
    logits = np.random.default_rng(0).normal(size=(len(all_uids), 6)).astype(np.float32) * 5
    write_logits(tmp_path / "l.parquet", all_uids[::-1], logits[::-1])  # any row order: matched by uid
    tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "l.parquet"), top_k=4))
    uids, v, i = stored(fresh)
    ref = dict(zip(all_uids, logits))
    assert sorted(uids) == sorted(kept_uids(fresh))
    np.testing.assert_array_equal(i, np.argsort(-np.stack([ref[u] for u in uids]), axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(v, np.stack([(np.sort(ref[u])[::-1] - ref[u].max())[:4] for u in uids])
                                  .astype(np.float16))
    np.save(tmp_path / "m.npy", logits)
    pq.write_table(pa.table({"uid": all_uids}), tmp_path / "m.parquet")
    tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "m.npy"), top_k=4))
    assert stored(fresh)[0] == uids and np.array_equal(stored(fresh)[2], i)
    got = ld.load_teacher(fresh, uids[::-1])
    np.testing.assert_array_equal(got["topk_indices"], i[::-1])
    assert got["topk_values"].dtype == np.float16 and got["topk_indices"].dtype == np.int32
    assert got["tail_lse"].shape == (len(uids), len(TAIL_TEMPERATURES))
    tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "m.npy")))  # default: full
    info = ld.teacher_info(fresh)
    assert info["format"] == "full" and info["top_k"] is None and info["num_classes"] == 6
    full = ld.load_teacher(fresh, uids)["logits"]
    want = np.stack([ref[u] - ref[u].max() for u in uids])
    assert full.dtype == np.float16 and full.shape == (len(uids), 6)
    np.testing.assert_allclose(full.astype(np.float32), want, atol=2e-2)
    not_kept = sorted(set(all_uids) - set(uids))[0]
    with pytest.raises(KeyError, match="no teacher output for uid"):
        ld.load_teacher(fresh, [not_kept])


def test_resume_and_config_change(fresh, tmp_path, monkeypatch):
    all_uids = pq.read_table(fresh / "manifest")["uid"].to_pylist()
    write_logits(tmp_path / "l.parquet", all_uids, np.random.default_rng(1).normal(size=(len(all_uids), 3)))
    cfg = tm.TeacherConfig(source="logits", logits=str(tmp_path / "l.parquet"), top_k=2, classes=CLASSES)
    first = tm.run_teacher(fresh, cfg)
    before = {p.name: p.read_bytes() for p in (fresh / "teacher").glob("*.parquet")}
    monkeypatch.setattr(tm, "build_teacher", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert tm.run_teacher(fresh, cfg) == first  # every shard done: nothing is built or recomputed
    assert before == {p.name: p.read_bytes() for p in (fresh / "teacher").glob("*.parquet")}
    with pytest.raises(AssertionError, match="recomputed"):  # another top_k: the stage starts over
        tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "l.parquet"), top_k=3))


def test_errors_name_the_problem(fresh, tmp_path):
    with pytest.raises(ConfigError, match="teacher.classes"):
        tm.TeacherConfig(source="zero_shot")
    with pytest.raises(ConfigError, match="teacher.top_k"):
        tm.TeacherConfig(source="logits", logits="x.parquet", top_k=0)
    uids = pq.read_table(fresh / "manifest")["uid"].to_pylist()
    write_logits(tmp_path / "few.parquet", uids[:3], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no logits for uid"):
        tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "few.parquet")))
    write_logits(tmp_path / "five.parquet", uids, np.zeros((len(uids), 5)))
    with pytest.raises(ValueError, match="gives 5 logits per sample but teacher.classes names 3"):
        tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "five.parquet"),
                                               classes=CLASSES))
    with pytest.raises(FileNotFoundError, match="no teacher outputs"):
        ld.teacher_info(tmp_path)


def test_topk_is_pure_and_stable():
    v, i, tail = tm.topk(np.array([[1.0, 3.0, 3.0, -1.0], [0.0, 0.0, 0.0, 0.0]]), 3)
    assert i.tolist() == [[1, 2, 0], [0, 1, 2]] and v.dtype == np.float16 and i.dtype == np.int32
    assert v[0].tolist() == [0.0, 0.0, -2.0] and tail[0, 0] == pytest.approx(-4.0) and tail[1, 1] == 0.0
    assert tm.topk(np.ones((2, 2)), 5)[0].shape == (2, 2) and np.isneginf(tm.topk(np.ones((2, 2)), 5)[2]).all()


def test_many_classes_need_top_k(fresh, tmp_path, monkeypatch):
    uids = pq.read_table(fresh / "manifest")["uid"].to_pylist()
    monkeypatch.setattr(tm, "MAX_FULL_CLASSES", 5)
    write_logits(tmp_path / "six.parquet", uids, np.zeros((len(uids), 6)))
    with pytest.raises(ConfigError, match="--top-k"):
        tm.run_teacher(fresh, tm.TeacherConfig(source="logits", logits=str(tmp_path / "six.parquet")))


def test_integer_labels_are_teacher_columns(tmp_path):
    """Labels {3, 17, 999} with a 1000-class teacher: label c is teacher column c, as in DP4TL (issue 12)."""
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline
    from datapruning.pipelines import train

    n = 30
    labels = np.array([3, 17, 999] * 10)
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    uids = [f"u{i:02d}" for i in range(n)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"uid": uids, "embedding": pa.array(list(x), pa.list_(pa.float32())), "label": labels}),
                   tmp_path / "in" / "part-000.parquet")
    run_pipeline(load_config(None, ["embed.encoder=precomputed", "cluster.k=2", "select.metric=random",
                                    "score.metrics=[random]"]), str(tmp_path / "in"), tmp_path / "run")
    logits = np.zeros((n, 1000), np.float32)
    logits[np.arange(n), labels] = 10.0  # the teacher predicts each sample's own label
    write_logits(tmp_path / "t.parquet", uids, logits)
    tm.run_teacher(tmp_path / "run", tm.TeacherConfig(source="logits", logits=str(tmp_path / "t.parquet")))
    man = pq.read_table(tmp_path / "run" / "manifest").filter(pc.field("keep"))
    kept, kept_labels = man["uid"].to_pylist(), man["label"].to_pylist()
    names, c = train.label_space(kept_labels, ld.teacher_info(tmp_path / "run")["classes"])
    assert c <= ld.teacher_info(tmp_path / "run")["num_classes"] == 1000
    argmax = ld.load_teacher(tmp_path / "run", kept)["logits"].astype(np.float32).argmax(1)
    np.testing.assert_array_equal(argmax, train.encode(kept_labels, names))


def test_cli_teacher(fresh, tmp_path, capsys):
    from datapruning.cli import main

    uids = pq.read_table(fresh / "manifest")["uid"].to_pylist()
    write_logits(tmp_path / "l.parquet", uids, np.random.default_rng(2).normal(size=(len(uids), 3)))
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    assert main(["teacher", str(fresh), "--source", "logits", "--logits", str(tmp_path / "l.parquet"),
                 "--classes-file", str(tmp_path / "classes.txt"), "--top-k", "2", "--all"]) == 0
    assert "top-2 of 3 classes for 24 all samples" in capsys.readouterr().out
    assert ld.teacher_info(fresh)["classes"] == list(CLASSES)
    assert main(["teacher", str(fresh), "--source", "zero_shot"]) == 2
    assert "teacher.classes" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["os:system", "os:getcwd", "json:JSONDecoder"])
def test_a_module_that_is_not_a_model_class_is_one_line(fresh, spec):
    import subprocess
    import sys

    layout = RunLayout(fresh)
    cached = layout.shard_file("teacher", "00000")  # stands for an earlier teacher's outputs
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(b"cached")
    layout.marker("teacher").parent.mkdir(parents=True, exist_ok=True)
    layout.marker("teacher").write_text('{"stage": "teacher", "fingerprint": "another"}')
    r = subprocess.run([sys.executable, "-m", "datapruning", "teacher", str(fresh), "--source", "module",
                        "--module", spec, "--allow-random-weights"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"teacher.module {spec!r} is a" in r.stderr and "not a torch.nn.Module class" in r.stderr
    assert cached.read_bytes() == b"cached"  # refused before the cached outputs were cleared
