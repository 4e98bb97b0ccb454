"""Every benchmark runs in --quick mode, so the scripts cannot rot: real runs, checked results, no timings asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_bench(name: str, tmp_path, *extra) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), "--quick", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written and written["quick"] is True
    assert written["machine"]["cpus"] >= 1 and "date" in written["machine"]
    return written


def test_bench_cluster_quick(tmp_path):
    r = run_bench("bench_cluster", tmp_path, "--backend", "faiss")
    assert r["ours_s"] > 0 and r["bare_faiss_s"] > 0 and r["ratio"] > 0 and r["backend"] == "faiss"
    assert r["same_labels_as_bare"] > 0.99  # the stage runs faiss's k-means loop on the same sample and start


def test_bench_semdedup_quick(tmp_path):
    r = run_bench("bench_semdedup", tmp_path)
    assert r["same_scores"] and r["removed_at_eps_0.01"] > 0


def test_bench_pipeline_quick(tmp_path):
    r = run_bench("bench_pipeline", tmp_path)
    assert set(r["stages"]) == {"embed", "cluster", "score", "select", "manifest"}
    assert all(s["peak_rss_mib"] > 10 for s in r["stages"].values())
    assert r["kept"] == r["bare_kept"] > 0  # the stages select exactly what the bare script selects
    assert r["dedup"]["removed"] > 0


def test_bench_pipeline_flatness_quick(tmp_path):
    r = run_bench("bench_pipeline", tmp_path, "--sizes", "x")  # --quick picks two tiny sizes
    assert r["sizes"] == [2000, 4000] and set(r["peak_rss_mib"]) == {"embed", "cluster", "score", "select", "manifest"}
    assert all(len(v) == 2 and min(v) > 10 for v in r["peak_rss_mib"].values())
    assert all(r["same_kept_as_bare"]) and r["time_per_row_largest_over_smallest"] > 0


def test_bench_pipeline_shapes_quick(tmp_path):
    r = run_bench("bench_pipeline", tmp_path, "--shape", "dup30,longtail,k50k")
    assert set(r["shapes"]) == {"dup30", "longtail", "k50k"} and r["runs"]["k50k"]["k"] == 500
    for shape in r["shapes"].values():
        assert set(shape) == {"embed", "cluster", "score", "select", "manifest"}  # no stage failed
        assert all(s["peak_rss_mib"] > 10 and s["rss_vs_uniform"] > 0 for s in shape.values())
    assert r["shapes"]["dup30"]["score"]["passes"] >= 1 and r["runs"]["longtail"]["kept"] > 0


def test_bench_embed_quick(tmp_path):
    r = run_bench("bench_embed", tmp_path)
    assert r["images"] > 0 and r["ours_img_s"] > 0 and r["bare_img_s"] > 0
    assert r["rows_written"] == r["images"]
    assert r["model"].startswith("tiny") and r["random_weights"] is True


def test_bench_embed_text_quick(tmp_path):
    r = run_bench("bench_embed", tmp_path, "--modality", "text")
    assert r["modality"] == "text" and r["texts"] == r["rows_written"] > 0
    assert r["ours_text_s"] > 0 and r["bare_text_s"] > 0 and r["ratio"] > 0
    assert r["same_keys"] and r["max_abs_diff_vs_bare"] < 1e-5  # real MiniLM rows in file order, same as bare


def test_bench_embed_pair_quick(tmp_path):
    r = run_bench("bench_embed", tmp_path, "--modality", "pair")
    assert r["modality"] == "pair" and r["images"] > 0 and r["image_per_s"] > 0 and r["pair_per_s"] > 0
    assert r["pair_over_image_time"] > 0 and r["bare_text_per_s"] > 0


@pytest.mark.gpu
def test_bench_embed_quick_on_cuda(tmp_path):
    r = run_bench("bench_embed", tmp_path, "--device", "cuda")
    assert r["device"] == "cuda" and r["image_decode"] in ("tensor", "dali")  # dali where it is installed


def test_bench_el2n_quick(tmp_path):
    r = run_bench("bench_el2n", tmp_path, "--threads", "1")
    assert r["ours_s"] > 0 and r["bare_s"] > 0 and r["ratio"] > 0 and r["models"] == 2


def test_bench_el2n_classes_quick(tmp_path):
    r = run_bench("bench_el2n_classes", tmp_path)
    assert set(r["classes"]) == {"60", "200"} and r["bare"]["peak_rss_mib"] > 10 and r["n"] == 2000
    assert all(c["peak_rss_mib"] > 10 and c["us_per_row"] > 0 and c["rss_vs_bare"] > 0 for c in r["classes"].values())
