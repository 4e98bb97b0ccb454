"""Input discovery and atomic outputs."""
from __future__ import annotations

import os

import pytest

from datapruning.io.files import atomic_path, clean_temp, is_done, mark_done, write_bytes
from datapruning.io.shards import InputError, detect_format, expand_input, shard_names
from conftest import make_clip_retrieval


def test_expand_folder_brace_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    names = [os.path.basename(p) for p in expand_input(str(tmp_path))]
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(expand_input(str(tmp_path / "{00000..00001}.tar"))) == 2
    assert len(expand_input(str(tmp_path / "*.tar"))) == 3
    assert detect_format(expand_input(str(tmp_path))) == "webdataset"
    with pytest.raises(InputError, match="no such file"):
        expand_input(str(tmp_path / "{00000..00004}.tar"))


def test_clip_retrieval_folder_and_mixed_formats(tmp_path):
    folder = make_clip_retrieval(tmp_path / "cr", parts=3)
    paths = expand_input(str(folder))
    assert [os.path.basename(p) for p in paths] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert detect_format(paths) == "clip_retrieval"
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="set input.format"):
        detect_format([str(tmp_path / "a.tar"), str(tmp_path / "b.parquet")])


def test_shard_names_are_unique_and_safe():
    assert shard_names(["a/00001.tar", "b/00002.tar"]) == ["00001", "00002"]
    assert shard_names(["a/x.tar", "b/x.tar"]) == ["00000-x", "00001-x"]
    assert shard_names(["s3://bucket/we ird.tar"]) == ["we_ird"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert not target.exists() and not list(tmp_path.iterdir())
    write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    (tmp_path / ".out.bin.abc.tmp").write_bytes(b"left by a kill")
    assert clean_temp(tmp_path) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert not is_done(tmp_path, "s")
    mark_done(tmp_path, "s", {"rows": 1})
    assert is_done(tmp_path, "s")


def test_parquet_with_a_non_utf8_column_name_is_an_input_error(tmp_path):
    """pyarrow decodes column names lazily; a name that is not UTF-8 must fail as InputError at read time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datapruning.errors import InputError
    from datapruning.io.tables import read_parquet

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"zzzzzz": [1, 2]}), path, store_schema=False)
    data = path.read_bytes()
    assert b"zzzzzz" in data  # the schema and the column chunk name it
    path.write_bytes(data.replace(b"zzzzzz", b"\x80zzzzz"))
    with pytest.raises(InputError, match="bad.parquet: not a readable parquet file"):
        read_parquet(str(path))


def test_download_folder_lists_tars_not_side_files(tmp_path, monkeypatch):
    from conftest import make_download_folder

    make_download_folder(tmp_path / "dl", n_shards=2, per_shard=2)
    monkeypatch.chdir(tmp_path)
    for spec in ("dl", "dl/*", "dl/{00000000..00000001}.tar"):
        paths = expand_input(spec)
        assert paths == [str(tmp_path / "dl" / f"0000000{i}.tar") for i in range(2)], spec  # absolute
        assert detect_format(paths) == "webdataset" and shard_names(paths) == ["00000000", "00000001"]


def test_npy_and_datacomp_metadata_folders(tmp_path):
    import numpy as np
    from conftest import make_datacomp_metadata

    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "a.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "n" / "a.parquet").write_bytes(b"")  # the id file of a.npy, not a shard
    assert detect_format(expand_input(str(tmp_path / "n"))) == "npy"
    make_datacomp_metadata(tmp_path / "dc", n_shards=2, per_shard=3)
    paths = expand_input(str(tmp_path / "dc"))
    assert [os.path.basename(p) for p in paths] == ["00000000.parquet", "00000001.parquet"]
    assert detect_format(paths) == "datacomp"


def test_markers_live_beside_the_folder(tmp_path):
    from datapruning.io.files import clean_stage, done_path, stage_marker

    stage = tmp_path / "manifest"
    mark_done(stage, "00001", {"rows": 3})
    assert done_path(stage, "00001") == tmp_path / "_meta" / "manifest" / "_00001.done.json"
    assert stage_marker(stage).parent == tmp_path / "_meta" / "manifest" and not stage.exists()
    clean_stage(stage)
    assert not is_done(stage, "00001")
