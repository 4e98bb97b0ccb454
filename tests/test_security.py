"""Hostile inputs: no pickle is ever loaded, YAML is safe, nothing reaches a shell."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
UNSAFE = re.compile(r"allow_pickle\s*=\s*True|pickle\.loads?\(|yaml\.load\(|shell\s*=\s*True|os\.system\(|"
                    r"weights_only\s*=\s*False|(?<![\w.])eval\(|(?<![\w.])exec\(")


def test_no_unsafe_calls_in_the_code():
    hits = []
    for folder in ("datapruning", "pipelines", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line.split("#", 1)[0]) and "re.compile" not in line:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


def test_pickled_npy_input_is_refused(tmp_path):
    """An object-array .npy (which needs pickle to load) is refused with a one-line error, unexecuted."""
    folder = tmp_path / "cr"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    marker = tmp_path / "pwned"
    np.save(folder / "img_emb" / "img_emb_0.npy", np.array([Boom(str(marker))], dtype=object), allow_pickle=True)
    pq.write_table(pa.table({"image_path": ["a.jpg"]}), folder / "metadata" / "metadata_0.parquet")
    proc = subprocess.run([sys.executable, "-m", "datapruning.cli", "run", "--input", str(folder), "--output",
                           str(tmp_path / "run"), "--set", "embed.encoder=precomputed", "--set", "cluster.k=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "img_emb_0.npy: not a readable .npy array" in proc.stderr
    assert not marker.exists()


class Boom:
    """Unpickling this would create a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
