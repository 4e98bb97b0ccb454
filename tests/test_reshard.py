"""Resharding a real run's kept samples: exact round trip (uids and member bytes), determinism, resume, safety."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datapruning.consumers import reshard as rs
from datapruning.errors import UnsafeMember
from datapruning.config import load_config
from datapruning.runner import run_pipeline
from conftest import add_member, make_png_shards, tiny_clip_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_config) -> Path:
    """A real run: 4 PNG shards x 7 samples, tiny random-init open_clip, keep 50% -> 14 kept samples."""
    root = tmp_path_factory.mktemp("reshard")
    make_png_shards(root / "shards", n_shards=4, per_shard=7)
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config))
    run_pipeline(cfg, str(root / "shards"), root / "run")
    return root / "run"


def tar_samples(path) -> list[tuple[str, dict]]:
    """(key, {suffix: bytes}) per sample, in tar order, read with plain tarfile."""
    out: list[tuple[str, dict]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            dot = m.name.find(".", m.name.rfind("/") + 1)
            key, suffix = m.name[:dot], m.name[dot + 1:]
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][suffix] = tar.extractfile(m).read()
    return out


def kept_originals(run: Path) -> dict[str, dict]:
    """uid -> {suffix: bytes} of every kept sample, straight from the input tars."""
    kept = pq.read_table(run / "kept.parquet")
    wanted = set(kept["uid"].to_pylist())
    shards = json.loads((run / "shards.json").read_text())["shards"]
    out = {}
    for s in shards:
        for key, members in tar_samples(s["path"]):
            if f"{s['name']}/{key}" in wanted:
                out[f"{s['name']}/{key}"] = members
    assert len(out) == len(wanted) == 14
    return out


def read_output(out: Path) -> list[tuple[str, dict]]:
    return [s for f in sorted(out.glob("*.tar")) for s in tar_samples(f)]


def test_round_trip_equals_kept_set(run, tmp_path):
    summary = rs.reshard(run, tmp_path / "out", samples_per_shard=3, workers=2)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"{i:08d}.tar" for i in range(5)] == summary["shards"]
    samples = read_output(out)
    expected = kept_originals(run)
    assert [k for k, _ in samples] == list(expected)  # every kept uid once, in input order
    assert dict(samples) == expected  # and every member byte-for-byte
    counts = [json.loads((out / f"{i:08d}_stats.json").read_text())["successes"] for i in range(5)]
    assert counts == [3, 3, 3, 3, 2] and [len(tar_samples(out / n)) for n in names] == counts
    assert summary["pattern"].endswith("{00000000..00000004}.tar") and not (out / rs.PIECES).exists()
    assert json.loads((out / "sizes.json").read_text()) == dict(zip(names, counts))  # open_clip, DataComp
    assert not (out / "_meta").exists()  # the pieces' done markers go with the pieces
    # a plain webdataset pipeline reads the output, keys = manifest uids
    got = {s["__key__"]: s for s in wds.WebDataset(summary["pattern"], shardshuffle=False)}
    assert set(got) == set(expected) and all(got[u]["png"] == expected[u]["png"] for u in expected)
    if shutil.which("tar"):  # GNU tar agrees that the concatenated shards are well-formed
        listing = subprocess.run(["tar", "-tf", str(out / names[1])], capture_output=True, text=True, check=True)
        assert len(listing.stdout.split()) == 3 * 3


def test_deterministic_across_workers_and_shard_sizes(run, tmp_path):
    rs.reshard(run, tmp_path / "a", samples_per_shard=4, workers=2)
    rs.reshard(run, tmp_path / "b", samples_per_shard=4, workers=1)
    for f in sorted((tmp_path / "a").glob("*.tar")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    rs.reshard(run, tmp_path / "big", samples_per_shard=100)
    assert [k for k, _ in read_output(tmp_path / "big")] == [k for k, _ in read_output(tmp_path / "a")]
    assert len(list((tmp_path / "big").glob("*.tar"))) == 1


def test_original_keys(run, tmp_path):
    rs.reshard(run, tmp_path / "o", samples_per_shard=5, keys="original")
    keys = [k for k, _ in read_output(tmp_path / "o")]
    assert keys == [u.split("/", 1)[1] for u in kept_originals(run)]
    tasks = [{"name": "a", "offset": 0, "keys": ["x", "y"]}, {"name": "b", "offset": 2, "keys": ["x"]}]
    with pytest.raises(ValueError, match="key 'x' of shard b repeats one of shard a"):
        rs._check_original_keys(tasks, per_shard=3)
    rs._check_original_keys(tasks, per_shard=2)  # different output shards: fine


def test_resume_after_crash_gives_the_same_bytes(run, tmp_path, monkeypatch):
    rs.reshard(run, tmp_path / "clean", samples_per_shard=3)
    names = [n for n in ("00000", "00001", "00002", "00003") if rs.kept_keys(run, n)]
    assert len(names) >= 3
    calls = []
    real_one, real_assemble = rs.reshard_one, rs.assemble

    def one(task):
        calls.append(task["name"])
        if task["name"] == names[1] and len(calls) <= 2:
            raise RuntimeError("killed")
        return real_one(task)

    monkeypatch.setattr(rs, "reshard_one", one)
    with pytest.raises(RuntimeError, match="killed"):
        rs.reshard(run, tmp_path / "crash", samples_per_shard=3)
    assert calls == names[:2]
    marker = json.loads((tmp_path / "crash" / "_reshard.json").read_text())
    assert marker["complete"] is False
    monkeypatch.setattr(rs, "assemble", lambda *a: (_ for _ in ()).throw(RuntimeError("killed in assembly")))
    with pytest.raises(RuntimeError, match="killed in assembly"):
        rs.reshard(run, tmp_path / "crash", samples_per_shard=3)
    assert calls[2:] == names[1:]  # finished input shards are not read again
    n_calls = len(calls)
    monkeypatch.setattr(rs, "assemble", real_assemble)
    rs.reshard(run, tmp_path / "crash", samples_per_shard=3)
    assert len(calls) == n_calls
    for f in sorted((tmp_path / "clean").glob("*")):
        if f.name != "_reshard.json":
            assert f.read_bytes() == (tmp_path / "crash" / f.name).read_bytes(), f.name
    rs.reshard(run, tmp_path / "crash", samples_per_shard=3)  # finished: a no-op
    with pytest.raises(ValueError, match="another run, kept set or shard size"):
        rs.reshard(run, tmp_path / "crash", samples_per_shard=4)


def test_refuses_foreign_output_folder_and_bad_args(run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        rs.reshard(run, tmp_path / "busy", samples_per_shard=3)
    with pytest.raises(ValueError, match="samples_per_shard"):
        rs.reshard(run, tmp_path / "x", samples_per_shard=0)


def test_changed_input_shard_is_an_error(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shards = json.loads((copy / "shards.json").read_text())
    first = next(s for s in shards["shards"] if rs.kept_keys(copy, s["name"]))
    src = Path(first["path"])
    kept = rs.kept_keys(copy, first["name"])
    new = tmp_path / "changed.tar"
    with tarfile.open(new, "w") as tar:
        for key, members in tar_samples(src):
            if key != kept[0]:
                for suffix, data in members.items():
                    add_member(tar, f"{key}.{suffix}", data)
    first["path"] = str(new)
    (copy / "shards.json").write_text(json.dumps(shards))
    with pytest.raises(ValueError, match=r"changed since the run read it \(size \d+ -> \d+ bytes\)"):
        rs.reshard(copy, tmp_path / "out", samples_per_shard=3)
    marker = copy / "_meta" / "embeddings" / f"_{first['name']}.done.json"  # no identity recorded (an older run)
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "input"}))
    with pytest.raises(ValueError, match="1 kept samples are not in the tar"):  # the samples are checked anyway
        rs.reshard(copy, tmp_path / "out", samples_per_shard=3)


def write_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("bad", ["link", "hardlink", "dotdot", "absolute"])
def test_unsafe_members_are_rejected(tmp_path, bad):
    members = [file_info("a.png", b"x"), file_info("a.txt", b"y")]
    if bad in ("link", "hardlink"):
        info = tarfile.TarInfo("b.png")
        info.type, info.linkname = (tarfile.SYMTYPE if bad == "link" else tarfile.LNKTYPE), "a.png"
        members.append((info, None))
    else:
        members.append(file_info("../b.png" if bad == "dotdot" else "/etc/b.png", b"z"))
    path = write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(UnsafeMember, match="shard bad: tar member"):
        list(rs.raw_samples(str(path), "bad"))


def test_raw_samples_group_like_the_embed_stage(tmp_path):
    path = write_tar(tmp_path / "s.tar", [
        file_info("dir/k1.PNG", b"1"), file_info("dir/k1.seg.json", b"2"), file_info("dir/k1.png", b"dup"),
        file_info("__meta__.json", b"skip"), file_info("noext", b"skip"), file_info("k2.txt", b"3"),
        file_info("dir/k1.txt", b"again")])
    got = [(k, [(s, d) for s, _, d in m]) for k, m in rs.raw_samples(str(path), "s")]
    assert got == [("dir/k1", [("PNG", b"1"), ("seg.json", b"2")]), ("k2", [("txt", b"3")])]
    truncated = tmp_path / "t.tar"
    truncated.write_bytes(path.read_bytes()[:1536])  # cut inside the third member
    with pytest.raises(rs.TruncatedShard, match="shard t"):
        list(rs.raw_samples(str(truncated), "t"))


def test_cli_reshard(run, tmp_path, capsys):
    from datapruning.cli import main

    assert main(["reshard", str(run), "--output", str(tmp_path / "cli"), "--samples-per-shard", "6",
                 "--workers", "2"]) == 0
    assert "wrote 14 samples in 3 shards" in capsys.readouterr().out
    assert main(["reshard", str(tmp_path), "--output", str(tmp_path / "x"), "-n", "2"]) == 2  # not a run folder
    assert "no shards.json" in capsys.readouterr().err


@pytest.mark.parametrize("fails", ["addfile", "close"])
def test_a_full_disk_names_the_tar_being_written(run, tmp_path, monkeypatch, capsys, fails):
    """ENOSPC while adding a member, or while closing the tar (its end blocks), is one line naming the output
    tar, and no temporary tar remains; before, a failing close gave a bare '[Errno 28] No space left on device'."""
    import errno

    from datapruning import cli

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if fails == "close":
        real_close = tarfile.TarFile.close

        def full_disk(self):  # noqa: F811 (the close variant: the end blocks of a tar being written do not fit)
            real_close(self)
            if self.mode == "w":
                raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, fails, full_disk)
    out = tmp_path / "re"
    assert cli.main(["reshard", str(run), "--output", str(out), "-n", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"datapruning reshard: error: cannot write {out}/") and len(err.splitlines()) == 1
    assert err.endswith(".tar: No space left on device")
    assert not list(out.rglob("*.tmp"))
