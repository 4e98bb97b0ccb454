"""EL2N + CCS recipe (Paul et al., NeurIPS 2021; Zheng et al., ICLR 2023).

When: labelled data and high pruning rates. EL2N = mean over M early models of ||softmax(f(x)) - y||;
CCS drops the hardest beta (likely mislabelled) and spreads the budget over 50 score strata, which fixes
keep-hardest's collapse. Paper: 50% of CIFAR-10 pruned with no loss (EL2N); at 90% pruning CCS beat prior
methods by >= 19.6 pp and random by 7 pp. Scores here come from 10 seeded proxy heads on the embeddings
unless you pass your own logits (score.params.el2n.logits + logits_uids).
Stages: embed -> cluster -> score (el2n, random) -> select (ccs, keep 30%) -> manifest.

    python -m datapruning.pipelines.el2n_ccs --input 'shards/{00000..00099}.tar' --output runs/el2n
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("el2n_ccs", __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
