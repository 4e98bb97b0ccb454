"""The embed chain's steps: order kept across decode threads, errors from the reader thread, decode settings."""
from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_clip_overrides
from datapruning.config import load_config
from datapruning.embed.decoders import PilDecoder, choose_decoder
from datapruning.embed.gpu_decode import TensorDecoder
from datapruning.embed.pipeline import ahead, prefetched
from datapruning.embed.stage import embed_tar_shard, get_encoder
from datapruning.errors import ConfigError
from test_gpu_decode import make_jpeg_shards


def test_ahead_keeps_order_on_its_threads():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, size=40)
    seen = set()

    def slow(i):
        time.sleep(delays[i])  # later items often finish first
        seen.add(threading.get_ident())
        return i * i

    assert list(ahead(slow, range(40), workers=3, depth=2)) == [i * i for i in range(40)]
    assert 1 < len(seen) <= 3 and threading.get_ident() not in seen
    seen.clear()
    assert list(ahead(slow, range(5), workers=0, depth=2)) == [0, 1, 4, 9, 16]
    assert seen == {threading.get_ident()}  # 0 workers: on the caller's thread


def test_prefetched_reraises_and_stops_its_thread():
    def items():
        yield 1
        yield 2
        raise KeyError("from the reader")

    with pytest.raises(KeyError, match="from the reader"):
        list(prefetched(items(), 1))
    made = []

    def endless():
        while True:
            made.append(1)
            yield len(made)

    stream = prefetched(endless(), 2)
    assert [next(stream) for _ in range(3)] == [1, 2, 3]
    before = threading.active_count()
    stream.close()  # the consumer stops early: the producer thread ends instead of blocking on a full queue
    assert threading.active_count() < before
    assert len(made) <= 3 + 2 + 1


class CountingDecoder:
    """A decode step that records the threads it runs on (the tensor step underneath)."""

    def __init__(self, inner):
        self.inner, self.name, self.fast, self.threads = inner, inner.name, inner.fast, set()

    def __call__(self, batch):
        self.threads.add(threading.get_ident())
        return self.inner(batch)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_decode_workers_are_honoured_on_the_tensor_path(tmp_path, tiny_clip_config, workers):
    shards = make_jpeg_shards(tmp_path / "jpg", n_shards=1, per_shard=30)
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.batch_size=2", "embed.image_decode=tensor",
                                                                     f"embed.decode_workers={workers}", "embed.prefetch=1"])
    encoder = get_encoder(cfg)
    decoder = CountingDecoder(choose_decoder(cfg, encoder))
    assert isinstance(decoder.inner, TensorDecoder)
    info = embed_tar_shard(cfg, str(shards / "00000.tar"), "00000", tmp_path / f"out{workers}", encoder,
                           decoder=decoder)
    assert info["rows"] == 30 and info["skipped"] == {"duplicate_key": 1}
    if workers == 0:
        assert decoder.threads == {threading.get_ident()}
    else:
        assert 1 <= len(decoder.threads) <= workers and threading.get_ident() not in decoder.threads
    ref_cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.batch_size=2", "embed.image_decode=pil"])
    ref = embed_tar_shard(ref_cfg, str(shards / "00000.tar"), "00000", tmp_path / "pil", encoder)
    assert ref["rows"] == info["rows"]
    a = pq.read_table(tmp_path / f"out{workers}" / "00000.parquet")
    b = pq.read_table(tmp_path / "pil" / "00000.parquet")
    assert a["uid"].equals(b["uid"])


def test_decode_settings_are_checked():
    with pytest.raises(ConfigError, match="embed.decode_workers"):
        load_config(None, ["embed.decode_workers=-1"])
    with pytest.raises(ConfigError, match="embed.prefetch"):
        load_config(None, ["embed.prefetch=0"])
    with pytest.raises(ConfigError, match="embed.image_decode"):
        load_config(None, ["embed.image_decode=nvjpeg"])


def test_text_and_pil_take_the_pil_step(tiny_clip_config):
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config))
    assert isinstance(choose_decoder(cfg, get_encoder(cfg)), PilDecoder)  # auto on CPU
