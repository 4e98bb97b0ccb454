"""Random recipe: a seeded uniform subset, the baseline everything is judged by.

Method: docs/methods.md#random-seeded-baseline.
When: always, as the control; and with knowledge distillation from a teacher trained on the full data,
where random pruning matched or beat sophisticated scores at every rate and a random 50% of ImageNet with
KD beat full-data training (Ben-Baruch et al., ICML 2025). Stages: embed -> cluster -> score (random)
-> select (keep 50%) -> manifest; then `datapruning teacher` and datapruning train for KD.

    python -m datapruning.pipelines.random_kd --input 'shards/{00000..00099}.tar' --output runs/random
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("random", __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
