"""Command line: a thin layer over datapruning.runner and friends (``datapruning --help``)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from ..config import load_config, to_dict
from ..errors import EXPECTED_ERRORS, ConfigError, run_command  # noqa: F401 (EXPECTED_ERRORS: for callers)
from ..run import STAGES, RunLayout, load_run_config, locked
from .tools import add_commands


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file or shipped config name ('datapruning configs'); "
                   "default: the run folder's, else built-in defaults")
    p.add_argument("--config", "-c", dest="config_flag", metavar="FILE", help="the same as the positional config")
    p.add_argument("--output", "-o", required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--workers", "-w", type=int, help="processes over shards (the same as --set workers=N)")
    p.add_argument("--allow-failed-shards", action="append_const", dest="set", const="input.allow_failed_shards=true",
                   help="go on (exit 0) without shards still unreadable after the retries; the summary names them")


def resolve_config(args):
    """The CLI's config: the file (or shipped config) given, else the run folder's stored one, else defaults;
    then --set and --workers."""
    from ..presets import config_file

    if args.config and args.config_flag and args.config != args.config_flag:
        raise ConfigError(f"two configs given: {args.config} and --config {args.config_flag}; give one")
    spec = args.config or args.config_flag
    overrides = args.set + ([f"workers={args.workers}"] if args.workers is not None else [])
    if spec:
        return load_config(config_file(spec), overrides)
    if RunLayout(args.output).config.exists():
        return load_config(None, overrides, base=to_dict(load_run_config(Path(args.output))))
    return load_config(None, overrides)


def cmd_run(args) -> int:
    from ..runner import run_pipeline

    with locked(args.output):  # before reading the stored config: another writer may be changing it
        stats = run_pipeline(resolve_config(args), args.input, args.output)
    print(f"kept {stats['kept']} of {stats['samples_in']} samples ({stats['kept_fraction']:.1%}); "
          f"manifest: {stats['manifest']}")
    report_failed(args.output)
    return 0


def report_failed(output) -> None:
    """Name the shards left out because they could not be read (only with --allow-failed-shards)."""
    from ..embed.stage import failed_shards

    layout = RunLayout(output)
    failed = failed_shards(layout.dir("embed"), layout.read_shards())
    if failed:
        print(f"left out {len(failed)} shard(s) that could not be read (a rerun retries them): "
              + ", ".join(sorted(failed)[:20]) + (" ..." if len(failed) > 20 else ""))


def cmd_stage(args) -> int:
    from ..runner import run_stage

    with locked(args.output):
        run_stage(args.command, resolve_config(args), args.output, getattr(args, "input", None))
    print(f"{args.command}: done ({args.output})")
    if args.command == "embed":
        report_failed(args.output)
    return 0


def cmd_status(args) -> int:
    """Each stage's state and what 'run' would redo, read from the markers and files (nothing is written)."""
    from ..config import config_from_dict
    from ..health import status_lines
    from ..io.files import read_json
    from ..io.lock import LOCK_NAME, describe
    from ..run import Run, RunLayout

    layout = RunLayout(args.run_dir)
    output = layout.root
    if not layout.config.is_file() or not layout.shards.is_file():
        print(f"{output}: not a run folder yet (no config.json or shards.json); nothing has run")
        return 0
    if (output / LOCK_NAME).exists():
        print(describe(output, read_json(output / LOCK_NAME)) + "; its state may change while you read this")
    for line in status_lines(Run(config_from_dict(read_json(layout.config)), output)):
        print(line)
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(args.output, overrides=args.set)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="datapruning", description="Prune image and image-text datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"datapruning {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="all stages: embed, cluster, score, select, manifest")
    _add_config_args(p)
    p.add_argument("--input", "-i", required=True, nargs="+", help="shards: folder, brace pattern, glob or URL")
    p.set_defaults(func=cmd_run)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage alone")
        _add_config_args(p)
        if stage == "embed":
            p.add_argument("--input", "-i", nargs="+", help="shards (default: those of the run folder)")
        p.set_defaults(func=cmd_stage)
    p = sub.add_parser("status", help="each stage: done, partial, stale or missing, with the shards concerned "
                                      "(writes nothing)")
    p.add_argument("run_dir", help="a run folder")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("demo", help="the offline demo on scikit-learn's digits with a self-trained encoder")
    p.add_argument("--output", "-o", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    add_commands(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer parses its own flags, --help included
        from ..pipelines.train import command

        return command(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature probe
    tqdm.monitor_interval = 0  # no daemon monitor thread: one waking during interpreter exit aborted the CLI
    if getattr(args, "input", None) is not None and len(args.input) == 1:
        args.input = args.input[0]
    return run_command(f"datapruning {args.command}", lambda: args.func(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
