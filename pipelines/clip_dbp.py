"""CLIP score -> SemDeDup -> DBP recipe: image-text pairs filtered by alignment, then deduplicated and pruned by
concept density (the order of the DBP paper's DataComp experiment, Abbas et al. 2024).

When: web image-text data (LAION, DataComp) where many captions do not describe their image.
Stages: embed both open_clip towers in one pass (embed.modality pair) -> cluster (k=100) -> score (clip_score,
semdedup, dbp) -> select: the 30% of pairs with the highest CLIP score stay in play, SemDeDup's eps that keeps
70% removes duplicates, DBP keeps 20% of the pool spread over clusters by complexity.

    python pipelines/clip_dbp.py --input 'shards/{00000..00999}.tar' --output runs/clip-dbp
    python pipelines/clip_dbp.py --precomputed --input metadata/ --output runs/clip-dbp --set input.format=datacomp
"""
import sys

from _recipe import main

if __name__ == "__main__":
    sys.exit(main("clip_dbp", __doc__))
