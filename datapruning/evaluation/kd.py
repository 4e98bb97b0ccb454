"""KD for the eval's probes: the teacher (full-data probe or cached logits) and alpha per kept fraction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, StageError
from ..io.files import read_json

@dataclass(frozen=True)
class KDSettings:
    """``alpha``: a number, or None for ``alpha_schedule(kept fraction)``; ``T``: temperature; ``teacher``:
    ``probe`` (softmax regression on every training row) or ``cached`` (RUN/teacher from ``datapruning teacher``)."""

    alpha: float | None = None
    T: float = 4.0
    teacher: str = "probe"

    def __post_init__(self):
        import math

        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"eval: --kd-alpha must be in [0, 1] or auto, got {self.alpha}")
        if not (math.isfinite(self.T) and self.T > 0):
            raise ConfigError(f"eval: --kd-T must be a finite temperature > 0, got {self.T}")
        if self.teacher not in ("probe", "cached"):
            raise ConfigError(f"eval: --teacher must be probe or cached, got {self.teacher!r}")

    def alpha_for(self, fraction: float) -> float:
        from ..consumers.kd import alpha_schedule

        return float(self.alpha) if self.alpha is not None else alpha_schedule(min(max(fraction, 0.0), 1.0))

    def as_dict(self) -> dict:
        return {"alpha": "alpha_schedule(kept fraction)" if self.alpha is None else self.alpha, "T": self.T,
                "teacher": self.teacher}


def cached_teacher_logits(run_dir: Path, uids: np.ndarray, labels: dict) -> np.ndarray:
    """Teacher logits [len(uids), C] for the eval's label codes (``labels``: their ``labels.label_coding``) from
    RUN/teacher/*.parquet: a full ``logits`` column, or top-k ``topk_values``/``topk_indices`` (the other
    classes get the smallest stored logit minus 20). The teacher's column of each code is ``labels.label_columns``':
    an integer label is its own column, string labels are matched to the teacher's ``classes`` by name."""
    from ..labels import label_columns
    from ..run import RunLayout

    layout = RunLayout(run_dir)
    folder = layout.dir("teacher")
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files or not layout.teacher_info.exists():
        raise StageError(f"eval: --teacher cached needs {folder}; run 'datapruning teacher {run_dir} --all' first")
    info = read_json(layout.teacher_info)
    columns = label_columns(labels, int(info["num_classes"]), info.get("classes") or None, "eval --teacher cached",
                            f"rerun 'datapruning teacher {run_dir}' with the teacher's class names (--classes)")
    code_of = np.full(int(info["num_classes"]), -1, np.int64)
    code_of[columns] = np.arange(len(columns))
    where = {str(u): i for i, u in enumerate(uids)}
    out = np.full((len(uids), len(columns)), np.nan, np.float32)
    for path in files:
        table = pq.read_table(path)
        rows = np.array([where.get(u, -1) for u in table["uid"].to_pylist()], dtype=np.int64)
        hit = rows >= 0
        if not hit.any():
            continue
        if "logits" in table.column_names:
            out[rows[hit]] = _matrix(table["logits"])[hit][:, columns]
            continue
        vals = _matrix(table["topk_values"])[hit]
        idx = code_of[_matrix(table["topk_indices"]).astype(np.int64)[hit]]
        block = np.repeat(vals.min(axis=1, keepdims=True) - 20.0, len(columns) + 1, axis=1)
        np.put_along_axis(block, np.where(idx >= 0, idx, len(columns)), vals, axis=1)  # other classes: a spare column
        out[rows[hit]] = block[:, :len(columns)]
    missing = int(np.isnan(out).any(axis=1).sum())
    if missing:
        raise StageError(f"eval: the cached teacher has no logits for {missing} of {len(uids)} sampled training "
                         f"rows; run 'datapruning teacher {run_dir} --all', or use --teacher probe")
    return out


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks()
    return np.asarray(flat.flatten(), np.float32).reshape(len(flat), -1)
