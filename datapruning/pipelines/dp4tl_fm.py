"""DP4TL feature-mapping recipe (Zhang et al., NeurIPS 2023) for unlabelled source data.

When: as label mapping, but the source has no labels: source k-means clusters stand in for classes and each
target embedding votes for its nearest source centroid. Same headline as LM (40-80% pruned, no loss).
Stages: embed -> cluster (k=200) -> score (dp4tl_fm) -> select (groups by cluster, 50% budget) -> manifest.

    python -m datapruning.pipelines.dp4tl_fm --input source/ --target runs/target/embeddings --output runs/fm
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("dp4tl_fm", __doc__, {"target": "score.params.dp4tl_fm.target"}, argv)


if __name__ == "__main__":
    sys.exit(main())
