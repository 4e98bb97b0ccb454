"""Shared command line for the recipes: one config from configs/, shards or precomputed embeddings."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(config_name: str, doc: str, required: dict[str, str] | None = None, argv=None) -> int:
    """Run ``configs/<config_name>.yaml``. ``required`` maps an extra flag to the config key it sets."""
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--input", "-i", required=True, help="webdataset shards, or embeddings with --precomputed")
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--precomputed", action="store_true", help="the input holds embeddings (parquet/npy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for flag, key in (required or {}).items():
        parser.add_argument(f"--{flag}", required=True, help=f"sets {key}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = (["embed.encoder=precomputed"] if args.precomputed else []) + [
        f"{key}={getattr(args, flag.replace('-', '_'))}" for flag, key in (required or {}).items()] + args.set
    stats = run_pipeline(load_config(CONFIGS / f"{config_name}.yaml", overrides), args.input, args.output)
    print(f"{config_name}: kept {stats['kept']} of {stats['samples_in']} ({stats['kept_fraction']:.1%}); "
          f"manifest {stats['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit("run one of the recipes, e.g. python pipelines/ssp.py --help")
