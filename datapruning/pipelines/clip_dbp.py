"""CLIP score -> SemDeDup -> DBP recipe: image-text pairs filtered by alignment, deduplicated, pruned by density.

The order of the DBP paper's DataComp experiment (Abbas et al. 2024).

When: web image-text data (LAION, DataComp) where many captions do not describe their image.
Stages: embed both open_clip towers in one pass (embed.modality pair) -> cluster (k=100) -> score (clip_score,
semdedup, dbp) -> select: the 30% of pairs with the highest CLIP score stay in play, SemDeDup's eps that keeps
70% removes duplicates, DBP keeps 20% of the pool spread over clusters by complexity.

    python -m datapruning.pipelines.clip_dbp --input 'shards/{00000..00999}.tar' --output runs/clip-dbp
    python -m datapruning.pipelines.clip_dbp --precomputed --input metadata/ --output runs/clip-dbp --set input.format=datacomp
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("clip_dbp", __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
