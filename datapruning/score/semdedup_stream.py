"""SemDeDup on a group of clusters above its memory budget: distinct rows on disk in keep order, row blocks as tasks.

One task reads the group's embeddings once in file order to hash them, collapses bit-identical rows
(``metrics.pairs``) and writes each cluster's distinct rows in keep order to a scratch file; tasks of a few
row blocks each then read the rows before their blocks back from that file, block by block; a last task puts
the values together into the group's scores file. Memory per task: about 80 bytes per row of the group and
``block_rows``² similarities, never the group's matrix. The scores are the in-memory path's bits.
See docs/scale.md#how-the-stages-scale.
"""
from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np

from ..cluster.parts import embedding_dim, fetch_rows, group_meta, group_spans, span_chunks
from ..io.files import write_npy
from ..metrics.pairs import first_copies, plan_queries, prefix_max, row_hashes
from ..metrics.ranking import rank_order
from ..metrics.semdedup import cluster_ranges, to_scores
from ..run import Run, log
from .groups import group_file, write_group_scores

CHUNK_BYTES = 16 << 20  # float32 rows hashed or copied per step
TASK_PAIRS = 1 << 28  # similarities (rows x earlier rows) per row-block task


def scratch(run: Run, group: int) -> Path:
    return run.layout.score_stream / f"g{group:05d}"


def plan_group(run: Run, offsets: np.ndarray, group: int, mode: str, seed: int) -> tuple[list[tuple], int]:
    """Hash, collapse and write the group's distinct rows (the first task). Returns one ``(first distinct row,
    distinct rows, first query, queries)`` per cluster and the group's rows; the per-row arrays stay in the
    scratch folder."""
    spans = group_spans(run, group)
    meta = group_meta(run, offsets, spans)
    step = max(1, CHUNK_BYTES // (4 * embedding_dim(run)))
    hashes = np.concatenate([row_hashes(x) for x in span_chunks(run, spans, step)])[meta["file"]]

    def fetch(at: np.ndarray) -> np.ndarray:
        return fetch_rows(run, spans, meta["file"][at])

    folder = scratch(run, group)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    table, reps, lengths = [], [], []
    row_query = np.empty(len(hashes), dtype=np.int64)
    with open(folder / "distinct.f32", "wb") as fh:
        for _, rows in cluster_ranges(meta["cluster"], rank_order(meta["cos_dist"], mode, seed, meta["tie"])):
            q = plan_queries(first_copies(hashes[rows], lambda at, rows=rows: fetch(rows[at]), step))
            for s in range(0, len(q.distinct), step):
                fetch(rows[q.distinct[s:s + step]]).tofile(fh)
            start = (table[-1][0] + table[-1][1], table[-1][2] + table[-1][3]) if table else (0, 0)
            table.append((start[0], len(q.distinct), start[1], len(q.rep)))
            reps.append(q.rep)
            lengths.append(q.length)
            row_query[rows] = start[1] + q.query
    for name, arr in (("rep", np.concatenate(reps)), ("length", np.concatenate(lengths)), ("row_query", row_query),
                      ("shard", meta["shard"]), ("row", meta["row"])):
        write_npy(folder / f"{name}.npy", arr)
    log.info("semdedup: group %d streamed: %d rows, %d distinct", group, len(row_query), sum(t[1] for t in table))
    return table, len(row_query)


def block_tasks(table: list[tuple], block_rows: int) -> list[list[tuple]]:
    """The row-block tasks: lists of ``(first distinct row, first query, queries, lo, hi)`` segments (row blocks
    ``lo .. hi`` of one cluster), each task holding about ``TASK_PAIRS`` similarities (at least one block)."""
    tasks, segments, pairs = [], [], 0
    for r_start, n, q_start, n_q in table:
        lo = 0
        for r0 in range(0, n, block_rows):
            r1 = min(r0 + block_rows, n)
            pairs += (r1 - r0) * r1
            if r1 == n or pairs >= TASK_PAIRS:
                segments.append((r_start, q_start, n_q, lo, r1))
                lo = r1
            if pairs >= TASK_PAIRS:
                tasks, segments, pairs = tasks + [segments], [], 0
    return tasks + [segments] if segments else tasks


def block_task(folder: Path, d: int, block_rows: int, segments: list[tuple]) -> int:
    """``prefix_max`` of a task's row blocks, read from the scratch file; each segment's values go to
    ``v<first query>.npy``. Returns the values written."""
    done = 0
    for r_start, q_start, n_q, lo, hi in segments:
        rep = np.asarray(np.load(folder / "rep.npy", mmap_mode="r")[q_start:q_start + n_q])
        length = np.asarray(np.load(folder / "length.npy", mmap_mode="r")[q_start:q_start + n_q])

        def read(a: int, b: int, r_start=r_start) -> np.ndarray:
            return np.fromfile(folder / "distinct.f32", dtype=np.float32, count=(b - a) * d,
                               offset=(r_start + a) * d * 4).reshape(b - a, d)

        values = prefix_max(read, rep, length, lo, hi, block_rows)
        write_npy(folder / f"v{q_start + int(np.searchsorted(rep, lo)):012d}.npy", values)
        done += len(values)
    return done


def finish_group(folder: Path, out: Path, n_shards: int, n_queries: int) -> None:
    """Every row's score from the tasks' values, written as the group's scores file; the scratch folder goes."""
    values = np.full(n_queries, np.nan, dtype=np.float32)
    for path in folder.glob("v*.npy"):
        v = np.load(path)
        values[int(path.stem[1:]):int(path.stem[1:]) + len(v)] = v
    scores = to_scores(values[np.load(folder / "row_query.npy")])
    write_group_scores(out, n_shards, np.load(folder / "shard.npy"), np.load(folder / "row.npy"), scores)
    shutil.rmtree(folder)


def stream_group(run: Run, params, offsets: np.ndarray, group: int, out_dir: Path) -> int:
    """SemDeDup scores of one large group into ``out_dir``'s group file, on the run's executor; returns its rows."""
    table, rows = run.executor.call(plan_group, (run, offsets, group, params.mode, params.seed))
    folder, d = scratch(run, group), embedding_dim(run)
    items = block_tasks(table, int(params.block_rows))
    for _ in run.executor.map_unordered(partial(block_task, folder, d, int(params.block_rows)), items):
        pass
    n_queries = sum(t[3] for t in table)
    run.executor.call(finish_group, (folder, group_file(out_dir, group), len(run.shards), n_queries))
    return rows
