"""Subcommands around a finished run: eval, report, reshard, export-datacomp, teacher (parsing and printing only)."""
from __future__ import annotations

import argparse
from pathlib import Path


# ---------------------------------------------------------------- CLI
def cmd_eval(args) -> int:
    from ..evaluation.curves import DEFAULT_FRACTIONS, format_table, run_eval
    from ..evaluation.kd import KDSettings
    from ..evaluation.probe import ProbeSettings
    from ..run import RunLayout

    fractions = parse_fractions(args.fractions) if args.fractions else DEFAULT_FRACTIONS
    kd = KDSettings(alpha=None if args.kd_alpha == "auto" else number("--kd-alpha", args.kd_alpha), T=args.kd_T,
                    teacher=args.teacher)
    probe = ProbeSettings(max_iter=args.max_iter, threads=args.threads, **({"l2_grid": tuple(
        number("--l2", v) for v in args.l2.split(","))} if args.l2 else {}))
    result = run_eval(args.run_dir, args.label_column, fractions, args.seeds, args.tolerance, args.test_split,
                      args.test_fraction, None if args.max_rows == 0 else args.max_rows, args.kd, kd,
                      probe, args.curves, args.workers)
    s = result["summary"]
    print(f"sample: {s['sample']['rows']} of {s['sample']['labelled_rows']} labelled rows (--max-rows "
          f"{s['sample']['max_rows']}); linear-probe accuracy [95% interval] on {s['test_rows']} held-out rows "
          f"({s['split']}), by keep fraction of {s['train_rows']} training rows:")
    print(format_table(result["table"]))
    print(s["line"])
    layout = RunLayout(args.run_dir)
    print(f"table: {layout.curves}   plot: {layout.curves_png}   "
          f"recipe: {s['recommended'].get('config')}   ({s['wall_s']} s)")
    return 0


def number(flag: str, text: str) -> float:
    """A flag's value as a float; anything else is a one-line ConfigError naming the flag."""
    from ..config import show
    from ..errors import ConfigError

    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number, got {show(text)}") from None


def parse_fractions(text: str) -> list[float]:
    """``--fractions``: comma-separated keep fractions, each a number in (0, 1]."""
    from ..errors import ConfigError

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not 0.0 < value <= 1.0:  # also false for nan
            raise ConfigError(f"--fractions: {item[:50]!r} is not a keep fraction in (0, 1]")
        out.append(value)
    if not out:
        raise ConfigError("--fractions: no keep fraction given")
    return out


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pruning curves: linear-probe accuracy per recipe and keep fraction, with KD")
    p.add_argument("run_dir", help="a run folder (embed, cluster and score done; labels needed)")
    p.add_argument("--label-column", default="label", help="label column of the embeddings or manifest")
    p.add_argument("--fractions", default=None, help="keep fractions, comma-separated (default 0.1,0.2,0.3,0.5,0.7,0.9,1)")
    p.add_argument("--seeds", type=int, default=3, help="repeats of every randomised selector (default 3)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="accuracy drop allowed vs full data on the interval's lower bound (0.01 = 1 pp)")
    p.add_argument("--test-split", default=None, help="split value held out (default: test/val/... if present)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified hold-out size without a split")
    p.add_argument("--max-rows", type=int, default=200_000,
                   help="probe a seeded, label-stratified sample of at most this many labelled rows (0: all)")
    p.add_argument("--kd", choices=("auto", "all", "none"), default="auto",
                   help="KD curves: auto = for random and the best curves, all, none")
    p.add_argument("--kd-alpha", default="auto", help="KD weight, or auto: consumers.kd.alpha_schedule(fraction)")
    p.add_argument("--kd-T", type=float, default=4.0, help="KD temperature")
    p.add_argument("--teacher", choices=("probe", "cached"), default="probe",
                   help="KD teacher: the full-data probe, or RUN/teacher from 'datapruning teacher --all'")
    p.add_argument("--curves", default=None, help="only these curves, comma-separated (name+kd adds a KD twin)")
    p.add_argument("--max-iter", type=int, default=300, help="probe L-BFGS iteration cap per fit")
    p.add_argument("--l2", default=None, help="probe L2 grid, comma-separated (default 1e-2,1e-3,1e-4,1e-5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per probe fit (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="processes for the probe fits (0: auto, up to 2 from "
                   "5,000 training rows); the results do not depend on it")
    p.set_defaults(func=cmd_eval)


def cmd_report(args) -> int:
    from ..evaluation.report import build_report

    print(f"report: {build_report(args.run_dir, args.out).resolve()}")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of a run (RUN_DIR/report.html)")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
# ---------------------------------------------------------------- CLI
def add_reshard(sub) -> None:
    p = sub.add_parser("reshard", help="write the kept samples as new webdataset tars")
    p.add_argument("run_dir", help="run folder made by 'datapruning run'")
    p.add_argument("--output", "-o", required=True, help="folder for the new shards (new or empty)")
    p.add_argument("--samples-per-shard", "-n", type=int, required=True)
    p.add_argument("--workers", "-w", type=int, default=1, help="processes over input shards")
    p.add_argument("--keys", choices=("uid", "original"), default="uid",
                   help="sample keys: the manifest uid '<shard>/<key>' (unique; default) or the input __key__")
    p.set_defaults(func=cmd_reshard)
    p = sub.add_parser("export-datacomp", help="write the kept uids as DataComp's sorted u8,u8 .npy subset file")
    p.add_argument("run_dir")
    p.add_argument("out", help="output .npy (for DataComp's resharder.py --subset-file)")
    p.add_argument("--uid-source", choices=("auto", "uid", "key", "json"), default="auto",
                   help="where the 32-hex DataComp uid comes from: auto/json: the manifest's source_uid (the 'uid' "
                        "of each sample's .json; json re-reads the tars for older runs); uid or key: those columns")
    p.set_defaults(func=cmd_export)


def cmd_reshard(args) -> int:
    from ..consumers.reshard import reshard

    s = reshard(args.run_dir, args.output, args.samples_per_shard, args.workers, args.keys)
    n = len(s["shards"])
    print(f"wrote {s['samples']} samples in {n} shard{'s' * (n != 1)}: {s['pattern']}")
    return 0


def cmd_export(args) -> int:
    from ..consumers.datacomp import export_datacomp_uids

    info = export_datacomp_uids(args.run_dir, args.out, args.uid_source)
    print(f"wrote {info['uids']} DataComp uids (from {info['source']}) to {args.out}")
    return 0
# ---------------------------------------------------------------- CLI
def add_teacher(sub) -> None:
    p = sub.add_parser("teacher", help="cache teacher logits for the kept samples (for KD)")
    p.add_argument("run_dir", help="run folder made by 'datapruning run'")
    p.add_argument("--source", choices=("zero_shot", "module", "logits"), default="zero_shot")
    p.add_argument("--classes", help="comma-separated class names (class i = i-th name)")
    p.add_argument("--classes-file", help="class names, one per line")
    p.add_argument("--template", action="append", dest="templates", help="zero-shot prompt with {} (repeatable)")
    p.add_argument("--top-k", type=int, default=None, help="opt-in: store the top K logits plus a tail bin "
                   "(approximate KD) instead of the full logits (exact; the default up to 4096 classes)")
    p.add_argument("--on", choices=("auto", "embeddings", "images"), default="auto")
    p.add_argument("--all", action="store_true", help="every sample of the manifest, not only the kept ones")
    for flag in ("--model", "--model-config", "--pretrained", "--module", "--weights", "--logits"):
        p.add_argument(flag)
    p.add_argument("--allow-random-weights", action="store_true", default=None)
    p.add_argument("--logit-scale", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_teacher)


def config_from_args(args):
    from ..consumers.teacher import TeacherConfig

    classes = tuple(c.strip() for c in (args.classes or "").split(",") if c.strip())
    if args.classes_file:
        classes += tuple(line.strip() for line in Path(args.classes_file).read_text(encoding="utf-8").splitlines()
                         if line.strip())
    kw = {k: getattr(args, k) for k in ("source", "top_k", "on", "model", "model_config", "pretrained", "module",
                                        "weights", "logits", "allow_random_weights", "logit_scale", "batch_size",
                                        "device")}
    if args.templates:
        kw["templates"] = tuple(args.templates)
    return TeacherConfig(classes=classes, samples="all" if args.all else "kept", **kw)


def cmd_teacher(args) -> int:
    from ..consumers.teacher import run_teacher
    from ..run import RunLayout

    info = run_teacher(args.run_dir, config_from_args(args))
    kept = "all" if info["top_k"] is None else f"top-{info['top_k']} of"
    print(f"teacher {info['teacher']}: {kept} {info['num_classes']} classes for {info['rows']} "
          f"{info['samples']} samples in {RunLayout(args.run_dir).dir('teacher')}")
    return 0


# ---------------------------------------------------------------- shipped configs and the reference trainer
def add_configs(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped configs; 'configs show NAME' prints one (> my.yaml)")
    p.add_argument("action", nargs="?", choices=("list", "show", "path"), default="list")
    p.add_argument("name", nargs="?", help="a shipped config (show, path)")
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser("train", add_help=False, help="the reference trainer on a run ('datapruning train --help')")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)


def cmd_configs(args) -> int:
    from ..errors import ConfigError
    from ..presets import named_configs, summary

    named = named_configs()
    if args.action == "list":
        width = max(map(len, named))
        print("\n".join(f"{name:<{width}}  {summary(path)}" for name, path in named.items()))
        return 0
    if args.name not in named:
        raise ConfigError(f"configs {args.action}: name one of {', '.join(named)} (got {str(args.name)[:200]!r})")
    print(named[args.name].read_text(encoding="utf-8") if args.action == "show" else named[args.name], end=
          "" if args.action == "show" else "\n")
    return 0


def cmd_train(args) -> int:
    from ..pipelines.train import main

    main(args.args)
    return 0


def add_commands(sub) -> None:
    for add in (add_eval, add_report, add_reshard, add_teacher, add_configs):
        add(sub)
