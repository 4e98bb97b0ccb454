"""Named configs shipped in the package (``datapruning/configs/<name>.yaml``): list them, find one, show one."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: in the wheel, and configs/ in a checkout


def named_configs() -> dict[str, Path]:
    """Name -> file of every shipped config, sorted by name."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_file(spec: str | Path) -> Path:
    """A config file given as a path (an existing file wins) or as the name of a shipped config (``ssp``)."""
    path = Path(spec)
    if path.is_file() or path.suffix in (".yaml", ".yml", ".json") or len(path.parts) > 1:
        return path  # a missing file is reported by load_config, naming it
    named = named_configs()
    if str(spec) not in named:
        raise ConfigError(f"config {str(spec)[:200]!r}: no such file, and not a shipped config name "
                          f"({', '.join(named)}; 'datapruning configs' lists them)")
    return named[str(spec)]


def summary(path: Path) -> str:
    """The first comment line of a config: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
