"""Hostile inputs: no pickle is ever loaded, YAML is safe, nothing reaches a shell."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CODE = ("datapruning", "pipelines", "scripts")


def test_ruff_security_rules_find_nothing():
    """ruff's bandit rules (S: pickle, eval/exec, shell=True, yaml.load, unsafe tar extraction, ...) over the
    code a user runs, with the per-file ignores of pyproject.toml. ruff comes with the dev extra."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "S", "--output-format", "concise",
                           *CODE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_pickle_through_numpy_or_torch():
    """What ruff's S rules do not know: ``np.load(allow_pickle=True)`` and ``torch.load`` without
    ``weights_only=True`` both unpickle their input."""
    hits = []
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                owner = getattr(getattr(node.func, "value", None), "id", "")
                pickles = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True
                if name == "load" and owner == "torch":
                    weights_only = kw.get("weights_only")
                    pickles = not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
                if pickles:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
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
