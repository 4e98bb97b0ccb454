"""The recipes' shared command line: one shipped config, on shards or precomputed embeddings; errors in one line."""
from __future__ import annotations

import argparse
import logging


def main(config_name: str, doc: str, required: dict[str, str] | None = None, argv=None) -> int:
    """Run the shipped config ``config_name`` (``datapruning configs show NAME``). ``required`` maps an extra
    flag to the config key it sets."""
    from ..config import load_config
    from ..errors import run_command
    from ..presets import config_file
    from ..runner import run_pipeline

    prog = f"python -m datapruning.pipelines.{config_name}"
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0],
                                     epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    def run() -> int:
        stats = run_pipeline(load_config(config_file(config_name), overrides), args.input, args.output)
        print(f"{config_name}: kept {stats['kept']} of {stats['samples_in']} ({stats['kept_fraction']:.1%}); "
              f"manifest {stats['manifest']}")
        return 0

    return run_command(prog, run)
