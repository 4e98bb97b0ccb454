"""Fuzzing the readers: random and mutated bytes for tars and parquet, random YAML for configs.
Every input ends in a clean error of the expected type or a valid result, within hypothesis' deadline."""
from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from datapruning.config import ConfigError, RunConfig, load_config
from datapruning.config import to_dict
from datapruning.io.shards import InputError
from datapruning.io.precomputed import precomputed_chunks
from datapruning.io.webdataset import BadSample, iter_tar_samples
from conftest import add_member

CASES = {"fast": 60, "long": 600}


def n_cases(request) -> int:
    return CASES["long" if request.config.getoption("--long") else "fast"]


def valid_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            add_member(tar, f"k{i}.txt", f"caption {i}".encode())
            add_member(tar, f"k{i}.cls", str(i).encode())
    return buf.getvalue()


def valid_parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"uid": ["a", "b", "c"], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                                                                             pa.list_(pa.float32()))}), buf)
    return buf.getvalue()


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, val in edits:
        out[pos % len(out)] = val
    return bytes(out[:cut] if cut is not None else out)


mutations = st.tuples(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
                      st.one_of(st.none(), st.integers(0, 8192)))
blobs = st.one_of(st.binary(max_size=4096), mutations)


def check_tar(tmp_path, data: bytes) -> None:
    path = tmp_path / "fuzz.tar"
    path.write_bytes(data)
    skipped: Counter = Counter()
    samples = list(iter_tar_samples(str(path), "fuzz", skipped))
    keys = [s["__key__"] for s in samples]
    assert all(isinstance(k, str) for k in keys)
    assert all(isinstance(v, bytes) for s in samples for k, v in s.items() if k != "__key__")
    with pytest.raises(BadSample) if skipped else _nothing():
        list(iter_tar_samples(str(path), "fuzz", Counter(), strict=True))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fuzz_tar_reader(tmp_path, request):
    base = valid_tar()

    @settings(max_examples=n_cases(request), deadline=2000, suppress_health_check=list(HealthCheck))
    @given(blobs)
    def run(case):
        data = case if isinstance(case, bytes) else mutate(base, *case)
        check_tar(tmp_path, data)

    run()


def test_fuzz_parquet_reader(tmp_path, request):
    base = valid_parquet()
    cfg = RunConfig().input

    @settings(max_examples=n_cases(request), deadline=2000, suppress_health_check=list(HealthCheck))
    @given(blobs)
    def run(case):
        data = case if isinstance(case, bytes) else mutate(base, *case)
        path = tmp_path / "fuzz.parquet"
        path.write_bytes(data)
        try:
            uid, chunks = precomputed_chunks(str(path), "parquet", cfg, False, 1 << 20)
            for meta, matrix, _, _ in chunks:
                assert matrix.dtype == np.float32 and matrix.ndim == 2 and len(matrix) == meta.num_rows
        except InputError as exc:
            assert "fuzz.parquet" in str(exc) and "\n" not in str(exc)
            return

    run()


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12)
known_keys = st.sampled_from(sorted(f"{s}.{k}" for s, sec in to_dict(RunConfig()).items() if isinstance(sec, dict)
                                    for k in sec) + ["seed", "backend", "workers", "strict"])


def test_fuzz_config_reader(tmp_path, request):
    @settings(max_examples=n_cases(request), deadline=2000, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.text(max_size=300), yaml_values.map(lambda v: yaml.safe_dump(v)),
                     st.dictionaries(known_keys, yaml_values, max_size=5).map(_nest).map(yaml.safe_dump)))
    def run(text):
        path = tmp_path / "fuzz.yaml"
        path.write_text(text)
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert "\n" not in str(exc).strip()
            return
        assert isinstance(cfg, RunConfig)

    run()


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
