"""Shipped configs (datapruning.presets) and the CLI habits around them: names, --config, --workers, --version."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datapruning import __version__
from datapruning.cli import main
from datapruning.errors import ConfigError
from datapruning.pipelines import RECIPES
from datapruning.presets import CONFIG_DIR, config_file, named_configs
from conftest import make_parquet_shards

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_configs_are_the_shipped_ones():
    top = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    assert top and top == {p.name: p.read_bytes() for p in CONFIG_DIR.glob("*.yaml")}
    assert set(named_configs()) == {p[:-5] for p in top}


def test_top_level_pipelines_are_thin_wrappers():
    wrappers = {p.stem: p.read_text() for p in (ROOT / "pipelines").glob("*.py")}
    assert set(wrappers) == {*RECIPES, "train"}
    for name, text in wrappers.items():
        assert f"from datapruning.pipelines.{name} import" in text and len(text.splitlines()) <= 8, name
    for name in RECIPES:  # each recipe runs a shipped config
        assert f'run_recipe("{name.removesuffix("_kd")}"' in (ROOT / "datapruning" / "pipelines" / f"{name}.py").read_text()


def test_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_file("ssp") == CONFIG_DIR / "ssp.yaml"
    (tmp_path / "ssp").write_text("seed: 1\n")
    assert config_file("ssp") == Path("ssp")  # a file of that name wins
    assert config_file("my.yaml") == Path("my.yaml")  # missing files are load_config's to name
    with pytest.raises(ConfigError, match="not a shipped config name .*ssp"):
        config_file("nope")


def test_configs_command(capsys, tmp_path):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(named_configs())
    assert main(["configs", "show", "ssp"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "ssp.yaml").read_text()
    assert main(["configs", "show", "nope"]) == 2
    assert "name one of" in capsys.readouterr().err


def test_run_by_name_with_config_flag_and_workers(tmp_path, capsys):
    make_parquet_shards(tmp_path / "emb", n_shards=2, per_shard=40)
    common = ["--input", str(tmp_path / "emb"), "--set", "embed.encoder=precomputed", "--set", "cluster.k=4"]
    assert main(["run", "ssp", "--output", str(tmp_path / "a"), *common]) == 0
    assert main(["run", "--config", "ssp", "--output", str(tmp_path / "b"), "--workers", "2", *common]) == 0
    a, b = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("a", "b"))
    assert a["select"]["keep_fraction"] == 0.7 and a["select"]["metric"] == "ssp"  # from ssp.yaml
    assert b["workers"] == 2 and {**b, "workers": 1} == a
    assert (tmp_path / "a" / "kept.parquet").read_bytes() == (tmp_path / "b" / "kept.parquet").read_bytes()
    capsys.readouterr()
    assert main(["select", "ssp", "--config", "random", "--output", str(tmp_path / "a")]) == 2
    assert "two configs given" in capsys.readouterr().err


def test_version():
    proc = subprocess.run([sys.executable, "-m", "datapruning", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"datapruning {__version__}"


def test_a_missing_extra_is_named(monkeypatch):
    """Without matplotlib (core install), eval's plots fail in one line naming the extra that installs it."""
    import builtins

    from datapruning.errors import DataPruningError
    from datapruning.evaluation.plots import plot_curves

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    with pytest.raises(DataPruningError, match=r"eval's curves needs matplotlib: pip install 'datapruning\[report\]'"):
        plot_curves(None, {"full_accuracy": 1.0, "tolerance": 0.01}, Path("x.png"))
