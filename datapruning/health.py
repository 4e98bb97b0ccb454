"""A run folder's health: each stage done, partial, stale or missing; what a rerun redoes; redoing lost units."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import changed_keys, to_dict
from .errors import StageError
from .io.files import (META, clean_stage, damaged_units, done_path, marker_problems, meta_dir, read_json,
                       stage_marker)
from .io.shards import input_change
from .run import RunLayout, STAGE_KEYS, STAGES, Run, clear_outputs, fingerprint

log = logging.getLogger("datapruning")

# The stages that read the files under each folder of a run (the longest prefix wins). A lost file matters only
# while a stage that reads it still has to run: docs/reliability.md#deleting-stage-folders.
def _reading_stages() -> dict[str, tuple]:
    """Each run-relative path (``RunLayout``'s names) -> the stages that read the files under it."""
    layout = RunLayout(Path("/run"))
    rel = {name: getattr(layout, name).relative_to(layout.root).as_posix()
           for name in ("parts", "ties", "groups", "fit_info", "centroids", "score_parts")}
    stage = {s: layout.dir(s).relative_to(layout.root).as_posix() for s in ("embed", "cluster", "score", "select")}
    return {stage["embed"]: ("cluster", "score", "manifest"), stage["cluster"]: ("score", "select", "manifest"),
            rel["parts"]: ("score",), rel["ties"]: ("cluster",), rel["groups"]: ("score",), rel["fit_info"]: ("score",),
            rel["centroids"]: ("score", "select"), rel["score_parts"]: ("score",),
            stage["score"]: ("select", "manifest"), stage["select"]: ("manifest",)}


READERS = _reading_stages()


def readers(rel: str) -> tuple:
    """The stages that read the run's file ``rel`` (a path relative to the run folder)."""
    parts = Path(rel).parts
    for i in range(len(parts), 0, -1):
        if "/".join(parts[:i]) in READERS:
            return READERS["/".join(parts[:i])]
    return ()


# ---- what is lost ------------------------------------------------------------------------------------------
def stage_problems(run: Run, stage: str) -> dict[str, list[tuple[str, str]]]:
    """{unit: [(file, why), ...]} for the done units of ``stage`` whose files are gone, cut short or replaced:
    its shards (for the embed stage also a changed input shard), and its shared files: the cluster fit
    (``fit``), the score stage's cluster groups (``<metric> g<group>``) and the manifest's kept list and
    stats (``info``). Files are relative to the run folder."""
    folder = run.dir(stage)
    out = damaged_units(folder)
    layout = run.layout
    extra = {"cluster": {"fit": layout.fit_info}, "manifest": {"info": run.info_path(stage)}}.get(stage, {})
    for unit, marker in extra.items():
        if bad := marker_problems(marker, run.output):
            out[unit] = bad
    if stage == "cluster" and not layout.fit_info.exists() and any(meta_dir(folder).glob("_*.done.json")):
        out["fit"] = [(str(layout.fit_info.relative_to(run.output)), "missing")]  # the shards' centroids
    if stage == "score":
        parts = layout.score_parts  # per metric: the cluster groups' scores, their markers under parts/_meta
        for metric in sorted(p.name for p in (parts / META).glob("*") if p.is_dir()):
            for unit, bad in damaged_units(parts / metric).items():
                out[f"{metric} {unit}"] = [(str((parts / rel).relative_to(run.output)), why) for rel, why in bad]
    if stage == "embed":
        out.update({name: [(path, why)] for name, (path, why) in changed_inputs(run).items()})
    return out


def changed_inputs(run: Run) -> dict[str, tuple[str, str]]:
    """{shard: (input path, why)} of the embedded shards whose input file changed since (size or mtime)."""
    folder, out = run.dir("embed"), {}
    for shard in run.shards:
        marker = done_path(folder, shard["name"])
        if marker.exists() and (why := input_change(shard["path"], read_json(marker).get("input"))):
            out[shard["name"]] = (shard["path"], why)
    return out


def describe_problems(bad: dict, limit: int = 5) -> str:
    """'part-001 (embeddings/part-001.parquet is missing), ...' for a log line or a status line."""
    items = [f"{unit} ({str(rel)[:200]} is {why})" for unit, files in sorted(bad.items()) for rel, why in files[:1]]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def pending_redo(run: Run, stage: str) -> list[str]:
    """Units of ``stage`` dropped for a redo that ``settle`` has not compared yet."""
    return sorted(p.name[1:-len(".redo.json")] for p in meta_dir(run.dir(stage)).glob("_*.redo.json"))


def _fresh(run: Run, stage: str) -> bool:
    marker = stage_marker(run.dir(stage))
    return marker.exists() and read_json(marker).get("fingerprint") == fingerprint(
        run.cfg, stage, [s["path"] for s in run.shards])


# ---- redoing it ----------------------------------------------------------------------------------------------
def before_stage(run: Run, stage: str) -> None:
    """Before ``stage`` runs: drop its units whose files are lost (``redo_damaged``), then, if it has work left,
    check that the files it reads are whole."""
    if not run.layout.shards.exists():
        return
    fresh = _fresh(run, stage)
    if fresh:  # a stale stage is cleared whole by prepare_stage, and redone
        redo_damaged(run, stage)
    if not fresh or not run.info_path(stage).exists():
        check_inputs(run, stage)


def redo_damaged(run: Run, stage: str) -> None:
    """Drop the done markers of ``stage``'s units whose files are gone or changed, so the stage redoes them
    (named in the log). Each old marker is kept as ``_<unit>.redo.json`` until ``settle`` compares the redone
    files with it. A lost cluster fit is fitted again, and every shard assigned again."""
    bad = stage_problems(run, stage)
    if not bad:
        return
    folder = run.dir(stage)
    log.warning("%s: redoing %d unit(s) whose files are missing or changed: %s", stage, len(bad),
                describe_problems(bad))
    shards = {s["name"] for s in run.shards}
    units = set(bad) & shards
    if stage == "cluster" and "fit" in bad:  # refitted: every shard is assigned again
        run.layout.fit_info.unlink(missing_ok=True)
        units |= {name for name in shards if done_path(folder, name).exists()}
    groups = [u for u in bad if " " in u]
    for unit in groups:  # a redone cluster group feeds every shard's scores
        metric, group = unit.split(" ")
        done_path(run.layout.score_parts / metric, group).unlink(missing_ok=True)
    if groups:
        units |= {name for name in shards if done_path(folder, name).exists()}
    for unit in units:
        done, redo = done_path(folder, unit), meta_dir(folder) / f"_{unit}.redo.json"
        if redo.exists():  # an earlier redo not settled yet: its record is what the later stages were made from
            done.unlink(missing_ok=True)
        elif done.exists():
            os.replace(done, redo)
    run.info_path(stage).unlink(missing_ok=True)


def settle(run: Run, stage: str) -> None:
    """After ``stage`` ran: compare each redone unit's files (sha256) with the record it replaced. When all came
    out the same, the later stages stand; else they are stale, and cleared with the top-level outputs."""
    folder = run.dir(stage)
    redos = {r: done_path(folder, r.name[1:-len(".redo.json")]) for r in meta_dir(folder).glob("_*.redo.json")}
    ready = sorted(r for r, done in redos.items() if done.exists())
    if not ready:
        return

    def digests(path: Path) -> dict:
        return {k: v.get("sha256") for k, v in (read_json(path).get("files") or {}).items()}

    changed = [r.name[1:-len(".redo.json")] for r in ready if digests(r) != digests(redos[r])]
    later = STAGES[STAGES.index(stage) + 1:]
    if changed and later:
        log.warning("%s: %d redone unit(s) differ from before (%s); the later stages (%s) are stale and will be "
                    "redone", stage, len(changed), ", ".join(changed[:5]), ", ".join(later))
        clear_outputs(run)
        for name in later:
            clean_stage(run.dir(name))
    elif later:
        log.info("%s: the %d redone unit(s) came out the same as before; the later stages stand", stage, len(ready))
    for redo in ready:
        redo.unlink()


READS = {"embed": (), "cluster": ("embed",), "score": ("embed", "cluster"), "select": ("embed", "cluster", "score"),
         "manifest": ("embed", "cluster", "score", "select")}  # the earlier stages whose outputs each one reads


def check_inputs(run: Run, stage: str) -> None:
    """Stop when an earlier stage ``stage`` reads has not finished (or was cleared by a change before it), is
    still redoing units, or a file ``stage`` reads is gone or changed (a deleted folder, a cut file), naming the
    stage to rerun."""
    for earlier in READS[stage]:
        if earlier == "embed" and all(done_path(run.dir("embed"), s["name"]).exists() for s in run.shards):
            pass  # every shard read, but its last checks failed (no valid sample, ...): the stage itself says why
        elif not run.info_path(earlier).exists() and not pending_redo(run, earlier):
            raise StageError(f"{stage}: the {earlier} stage has not finished in {run.output} (never run, stopped, or "
                             f"cleared when a stage before it changed); run 'datapruning {earlier}' first (or "
                             "'datapruning run')")
        if pending := pending_redo(run, earlier):
            raise StageError(f"{stage}: the {earlier} stage has not finished redoing {', '.join(pending[:5])}; rerun "
                             f"'datapruning {earlier}' (or 'datapruning run') first")
        for files in stage_problems(run, earlier).values():
            for rel, why in files:
                if stage in readers(rel):
                    raise StageError(f"{stage}: {run.output / rel} is {why}; rerun 'datapruning {earlier}' to redo "
                                     "it (or 'datapruning run')")


# ---- what each stage holds, and what a run must do -----------------------------------------------------------
@dataclass
class StageState:
    """One stage of a run folder: ``state`` is done, partial, stale or missing; ``detail`` says which shards."""

    stage: str
    state: str
    detail: str = ""
    problems: dict = field(default_factory=dict)
    unfinished: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    finished: bool = False  # the stage's info marker is there

    def usable_for(self, reader: str) -> bool:
        """Whether ``reader`` can read this stage's outputs as they are."""
        return (self.state in ("done", "partial", "missing") and self.finished and not self.unfinished
                and not any(reader in readers(rel) for files in self.problems.values() for rel, _ in files))


def assess(run: Run) -> dict[str, StageState]:
    """Every stage's state, read from the markers and checked against the files (nothing is written)."""
    out: dict[str, StageState] = {}
    inputs = [s["path"] for s in run.shards]
    names = [s["name"] for s in run.shards]
    stale_before = None
    for stage in STAGES:
        folder, marker = run.dir(stage), stage_marker(run.dir(stage))
        stored = read_json(marker) if marker.exists() else None
        units = [n for n in names if done_path(folder, n).exists()]
        if stored is None and not units:
            out[stage] = StageState(stage, "missing", "not run yet", unfinished=names)
            continue
        if stored is not None and stored.get("fingerprint") != fingerprint(run.cfg, stage, inputs):
            changed = changed_keys(stored.get("config"), to_dict(run.cfg), STAGE_KEYS[stage])
            stale_before = stale_before or stage
            out[stage] = StageState(stage, "stale", "ran with another config or input"
                                    + (f" ({', '.join(changed[:5])})" if changed else ""))
            continue
        problems = stage_problems(run, stage)
        if stage == "embed" and (changed := changed_inputs(run)):
            stale_before = stage
            out[stage] = StageState(stage, "stale", "input changed since: " + describe_problems(
                {n: [v] for n, v in changed.items()}), problems=problems)
            continue
        if stale_before:
            out[stage] = StageState(stage, "stale", f"the {stale_before} stage it follows is stale")
            continue
        failed = [n for n in units if read_json(done_path(folder, n)).get("failed")] if stage == "embed" else []
        unfinished = [n for n in names if n not in units] + pending_redo(run, stage)
        st = StageState(stage, "done", f"{len(names)} shard(s)", problems, unfinished, failed,
                        run.info_path(stage).exists())
        whole = [n for n in units if n not in problems]
        if not problems and not unfinished and not failed and st.finished:
            out[stage] = st
            continue
        bits = [f"{len(whole)} of {len(names)} shard(s) whole"]
        if problems:
            bits.append("lost: " + describe_problems(problems))
        if unfinished:
            bits.append("not done: " + ", ".join(unfinished[:5]) + (" ..." if len(unfinished) > 5 else ""))
        if failed:
            bits.append("unreadable input: " + ", ".join(failed[:5]))
        st.state, st.detail = ("missing" if not whole and problems else "partial"), "; ".join(bits)
        out[stage] = st
    return out


def plan(run: Run, stages=STAGES, states: dict | None = None) -> dict[str, str]:
    """{stage: why} for the stages of ``stages`` a run must (re)do: the last one unless it is done; any earlier
    one whose lost files a stage that runs reads; a stage after one that is stale; the embed stage while a
    shard's input changed or could not be read. A stage whose files are lost but that nothing still reads is
    left as it is (see docs/reliability.md#deleting-stage-folders)."""
    if not run.layout.shards.exists():
        return {s: "not run yet" for s in stages}
    states = states or assess(run)
    runs: dict[str, str] = {}
    target = states[stages[-1]]
    if target.state != "done":
        runs[target.stage] = f"{target.state}: {target.detail}"
    if "embed" in stages and (states["embed"].failed or states["embed"].state == "stale"):
        runs["embed"] = f"{states['embed'].state}: {states['embed'].detail}"
    grew = True
    while grew:
        grew = False
        for stage in [s for s in stages if s in runs]:
            for earlier in stages[:stages.index(stage)]:
                if earlier not in runs and not states[earlier].usable_for(stage):
                    runs[earlier] = f"{states[earlier].state} ({states[earlier].detail}), and {stage} reads it"
                    grew = True
        for stage in [s for s in stages if s in runs and states[s].state == "stale"]:
            for later in stages[stages.index(stage) + 1:]:
                if later not in runs:
                    runs[later] = f"the {stage} stage before it is stale"
                    grew = True
    return {s: runs[s] for s in stages if s in runs}


def status_lines(run: Run) -> list[str]:
    """What ``datapruning status`` prints: one line per stage, then what ``datapruning run`` would redo."""
    states = assess(run)
    todo = plan(run, STAGES, states)
    lines = []
    for stage, st in states.items():
        note = ""
        if st.state != "done":
            note = "  [a run redoes it]" if stage in todo else "  [not needed: the stages after it are done]"
        lines.append(f"{stage:<9} {st.state:<8} {st.detail}{note}")
    lines.append("'datapruning run' would redo: " + (", ".join(todo) if todo else "nothing (the run is complete)"))
    return lines
