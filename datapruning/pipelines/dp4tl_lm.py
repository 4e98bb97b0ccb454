"""DP4TL label-mapping recipe (Zhang et al., "Selectivity Drives Productivity", NeurIPS 2023).

When: you pretrain on a labelled source set to transfer to a known downstream task. Keeps whole source
classes ranked by how many target samples a source classifier maps to them (zero-hit classes go first).
Paper: 40-80% of source classes pruned with no downstream loss, 2-5x faster pretraining.
Stages: embed -> cluster -> score (dp4tl_lm: linear classifier on source embeddings) -> select (groups by
label, 50% sample budget) -> manifest. --target: the target's embeddings from the same encoder.

    python -m datapruning.pipelines.dp4tl_lm --input source/ --target runs/target/embeddings --output runs/lm
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("dp4tl_lm", __doc__, {"target": "score.params.dp4tl_lm.target"}, argv)


if __name__ == "__main__":
    sys.exit(main())
