"""The HTML report: self-contained, renders in headless Chromium with every image decoded, thumbnails by key."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datapruning import cli
from datapruning.config import load_config
from datapruning.evaluation.curves import run_eval
from datapruning.evaluation.report import THUMB_PX, build_report
from datapruning.runner import run_pipeline
from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through selenium (installed by .ci/run), console logs captured."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def render(driver, page: Path, shot: Path) -> list:
    """Load ``page`` from file://, return [complete, naturalWidth, alt] per <img>; assert no console errors;
    save a full-page screenshot to ``shot`` and test-artifacts/."""
    driver.get(page.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getAttribute('alt')])")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(int(height) + 150, 16000))
    driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    return images


def assert_self_contained(text: str) -> None:
    """Every src/href is a data: URI or an in-page anchor: nothing to fetch."""
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs if not r.startswith(("data:", "#"))]
    assert "<script" not in text


def tar_png(path: Path, key: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(f"{key}.png").read()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_clip_config):
    root = tmp_path_factory.mktemp("report")
    shards = make_png_shards(root / "shards", n_shards=3, per_shard=12, classes=3)
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["score.metrics=ssp,random,semdedup,dbp"])
    run_pipeline(cfg, str(root / "shards"), root / "run")
    return root / "run", shards


def test_report_renders_in_chromium(image_run, browser, tmp_path):
    run, shards = image_run
    run_eval(run, fractions=(0.5, 1.0), seeds=2)
    out = build_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    assert_self_contained(text)
    for title in ("Pruning curves", "Clusters", "DBP quota vs cluster size", "Score histograms",
                  "Kept fraction per label", "Cluster samples", "SemDeDup duplicate pairs", "Config and stats"):
        assert f">{title}</h2>" in text, title
    assert 'alt="score histograms: ssp, random, semdedup, dbp"' in text
    assert "recommendation:" in text and "&quot;k&quot;: 3" in text  # eval summary and the resolved config
    images = render(browser, out, tmp_path / "report-images.png")
    assert len(images) >= 10 and all(done and width > 0 for done, width, _ in images), images
    # thumbnails are the samples' own images, read from the tar shards by key
    thumbs = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="\d+" height="\d+" alt="([^"]+)"', text)
    assert len(thumbs) >= 6
    for b64, uid in thumbs[:4]:
        shard, key = uid.split("/", 1)
        original = Image.open(io.BytesIO(tar_png(run.parent / "shards" / f"{shard}.tar", key))).convert("RGB")
        shown = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert shown.size == (THUMB_PX, THUMB_PX)
        assert np.array_equal(np.asarray(shown), np.asarray(original.resize((THUMB_PX, THUMB_PX), Image.NEAREST))), uid


def test_report_without_eval_or_images(tmp_path, browser):
    """Precomputed embeddings (no images, no text), DBP selection, no eval yet: still one working page."""
    make_parquet_shards(tmp_path / "emb", n_shards=2, per_shard=30)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", "select.method=dbp",
                             "select.keep_fraction=0.4"])
    run_pipeline(cfg, str(tmp_path / "emb"), tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert_self_contained(text)
    assert "No pruning curves yet" in text and "select used DBP" in text and "SemDeDup" not in text
    assert 'class="txt">id-' in text  # no image or text: the uid stands in
    images = render(browser, tmp_path / "r.html", tmp_path / "report-no-images.png")
    assert len(images) >= 4 and all(done and width > 0 for done, width, _ in images)


def test_report_needs_a_finished_run(image_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(image_run[0], run)
    next((run / "_meta" / "manifest").glob("_*.done.json")).unlink()
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest" in err and len(err.splitlines()) == 1
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb), a few bytes long."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_thumbnail_is_skipped(tmp_path, tiny_clip_config, caplog):
    """A text-tower run embeds captions only, so a sample whose PNG claims 30000x30000 pixels reaches the
    report, which must leave that thumbnail out (the sample shown by its uid), not stop."""
    from conftest import add_member

    make_png_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    with tarfile.open(tmp_path / "shards" / "bomb.tar", "w") as tar:
        for i in range(3):
            add_member(tar, f"z{i}.png", bomb_png())
            add_member(tar, f"z{i}.txt", f"a huge picture {i}".encode())
    out = tmp_path / "run"
    sets = [x for a in tiny_clip_overrides(tiny_clip_config) + ["embed.modality=text", "cluster.k=2"]
            for x in ("--set", a)]
    assert cli.main(["run", "--input", str(tmp_path / "shards"), "--output", str(out), *sets]) == 0
    assert cli.main(["report", str(out)]) == 0
    assert "shard bomb, key z" in caplog.text and "DecompressionBombError" in caplog.text
    assert "bomb/z" in (out / "report.html").read_text()  # shown by its uid


def test_eval_and_report_write_as_a_unit_and_name_the_file_on_enospc(tmp_path, monkeypatch, capsys):
    """eval/ is swapped in whole: a failed (or killed) rerun leaves the previous set untouched, the temporary
    folders a kill leaves are removed by the next eval, and a full disk is one line naming the file."""
    import errno
    import socket

    make_parquet_shards(tmp_path / "emb", n_shards=2, per_shard=40)
    run = tmp_path / "run"
    run_pipeline(load_config(None, ["embed.encoder=precomputed", "cluster.k=4"]), str(tmp_path / "emb"), run)
    args = ["eval", str(run), "--seeds", "1", "--kd", "none", "--fractions", "0.5,1", "--curves", "random"]
    assert cli.main(args) == 0
    before = {p.name: p.read_bytes() for p in (run / "eval").iterdir()}
    assert {"curves.parquet", "curves.png", "summary.json", "recommended.yaml"} <= set(before)
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
    for stale in (f".eval.p999999@{host}.x1.tmp", f".eval.p999999@{host}.old.x2.tmp"):  # left by a SIGKILL
        (run / stale).mkdir()
        (run / stale / "curves.parquet").write_bytes(b"half")
    real = Path.write_bytes

    def full_disk(self, data):
        if self.parent.name.startswith(".eval.") or self.name.startswith(".report.html."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    capsys.readouterr()
    assert cli.main(args + ["--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"datapruning eval: error: cannot write {run / 'eval' / 'recommended.yaml'}: No space left on device"
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir()} == before  # the old set, whole
    assert not list(run.glob(".eval*"))  # the stale folders and this run's own are gone
    assert cli.main(["report", str(run)]) == 2
    assert f"cannot write {run / 'report.html'}: No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(Path, "write_bytes", real)
    assert cli.main(args + ["--seeds", "2"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["seeds"] == 2 and not list(run.glob(".*.tmp"))
    assert summary["recommended"].get("config") in (None, str(run / "eval" / "recommended.yaml"))
