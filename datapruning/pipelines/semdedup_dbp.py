"""SemDeDup + DBP recipe (Abbas et al. 2023; ICLR 2024): the DBP paper's pipeline.

When: web-scale image-text data with near-duplicates and uneven concept density (LAION, DataComp).
Stages: embed -> cluster (k=500) -> score (semdedup, dbp, ssp) -> select: SemDeDup removes the
duplicates (eps that keeps 70%), then DBP spreads the 27.7% budget over clusters by softmax(complexity/0.1)
with exact quotas, keeping the hardest within each cluster. Paper: +1.1 pp ImageNet zero-shot over the
full-data OpenCLIP ViT-B/32 with 27.7% of the data and compute; a new best on DataComp-medium.

    python -m datapruning.pipelines.semdedup_dbp --input 'shards/{00000..00999}.tar' --output runs/dbp
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("semdedup_dbp", __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
