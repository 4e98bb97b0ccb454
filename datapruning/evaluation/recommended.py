"""``recommended.yaml``: the eval's recommendation as a complete ``datapruning run`` config.

The run's own config with the recommended selection, headed by the KD settings and commands for
``datapruning train``."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import load_config, to_dict
from ..io.files import write_bytes
from ..run import load_run_config

COMMON = ("metric", "mode", "min_per_cluster", "min_per_label")


def select_section(variant, fraction: float) -> dict:
    """The ``select:`` block that makes ``variant``'s selection at ``fraction`` in ``datapruning run``."""
    params = dict(variant.params)
    sel = {"method": variant.selector, "keep_fraction": float(fraction), "keep_count": None}
    sel.update({k: params.pop(k) for k in COMMON if k in params})
    sel["params"] = params
    if variant.dedup is not None:
        sel["dedup_keep_fraction"] = max(float(variant.dedup), float(fraction))
    return sel


def recommended_config(run_dir, variant, fraction: float) -> dict:
    """The run's resolved config with the recommended selection (checked by ``load_config``)."""
    data = to_dict(load_run_config(Path(run_dir)))
    defaults = to_dict(load_config(None, []))["select"]
    data["select"] = {**defaults, "min_per_cluster": 0.0, "min_per_label": 0.0, "dedup_eps": None,
                      "dedup_keep_fraction": None, **select_section(variant, fraction)}
    metrics = list(data["score"]["metrics"])
    for need in {variant.metric, variant.params.get("metric")} - {None, "cos_dist", "label"}:
        if need not in metrics and need != "dbp":
            metrics.append(need)
    if variant.dedup is not None and "semdedup" not in metrics:
        metrics.append("semdedup")
    data["score"]["metrics"] = metrics
    return to_dict(load_config(None, [], base=data))


def _named(side: dict | None, label: str) -> str:
    """One header line naming the best recipe of one side (with or without KD) and its interval."""
    if side is None:
        return ""
    if side.get("variant") is None:
        return f"# {label}: no curve stays within the tolerance below 1.0: keep all the data\n"
    cell = f"{side['accuracy']:.3f}" + (f" [{side['acc_lo']:.3f}, {side['acc_hi']:.3f}]" if "acc_lo" in side else "")
    return f"# {label}: keep {side['fraction']:g} with {side['variant']}, probe accuracy {cell}\n"


def write_recommended(run_dir, path: Path, variants: dict, rec: dict, kd, shown: Path | None = None) -> dict:
    """Write ``path`` (when there is a recommendation below 1.0) and return what the summary records; ``variants``:
    the eval's curves by name; ``shown``: the path to record, where ``path`` is a temporary one that will be
    renamed. The header names the best recipe with KD (and the full-data teacher it presumes) and without."""
    variant = variants.get(rec["variant"])
    if variant is None:
        return {"config": None, "note": "no curve qualified below fraction 1.0: keep all the data"}
    from ..consumers.kd import alpha_schedule

    frac = float(rec["fraction"])
    alpha = float(kd.alpha) if kd.alpha is not None else alpha_schedule(frac)
    train = {"kd": bool(variant.kd), "alpha": round(alpha, 4), "T": kd.T, "teacher": "a model trained on all the "
             "data; cache its logits with 'datapruning teacher RUN --source logits --logits FILE' (or zero_shot)"}
    cfg = recommended_config(run_dir, variant, frac)
    kd_flags = f" --kd --alpha {alpha:.2f} --T {kd.T:g}" if variant.kd else ""
    header = [
        f"# datapruning eval recommendation: {rec['line'].removeprefix('recommendation: ')}",
        f"# recipe: {variant.name} at keep fraction {frac:g}; the run config below is complete:",
        "#   datapruning run recommended.yaml --input 'YOUR/shards/{00000..00999}.tar' --output runs/pruned",
    ]
    if variant.kd:
        header += ["# then distil from a full-data teacher (KD settings for datapruning train):",
                   "#   datapruning teacher runs/pruned --source logits --logits TEACHER_LOGITS.parquet",
                   f"#   datapruning train runs/pruned{kd_flags}",
                   f"# kd: {{alpha: {alpha:.4f}, T: {kd.T:g}}}   (alpha = alpha_schedule({frac:g}) unless set)"]
    else:
        header += ["#   datapruning train runs/pruned        # no KD: the recipe was best without it"]
    plain = rec.get("without_kd")
    other = variants.get(plain.get("variant")) if plain and variant.kd else None
    sides = _named(rec.get("with_kd"), "with KD, which presumes " + rec.get("with_kd", {}).get("teacher", "")) \
        + _named(plain, "without KD")
    if other is not None:  # the KD recipe is the config below: the no-KD one as a select block to paste
        block = yaml.safe_dump({"select": select_section(other, plain["fraction"])}, default_flow_style=True,
                               width=1 << 20).strip()  # one line: it stays a comment
        sides += f"#   its select block: {block}\n"
    text = "\n".join(header) + "\n" + sides + yaml.safe_dump(cfg, sort_keys=False)
    write_bytes(path, text.encode("utf-8"))
    path = shown or path
    return {"config": str(path), "variant": variant.name, "fraction": frac, "select": cfg["select"], "train": train,
            "commands": [f"datapruning run {path} --input YOUR_SHARDS --output runs/pruned",
                         f"datapruning train runs/pruned{kd_flags}"],
            **({"without_kd_select": select_section(other, plain["fraction"])} if other is not None else {})}
