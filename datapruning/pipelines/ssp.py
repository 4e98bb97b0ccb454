"""SSP recipe: self-supervised prototypicality (Sorscher et al., NeurIPS 2022).

When: no labels, a good pretrained or self-supervised encoder, and a clear idea of how much data you have.
Stages: embed (open_clip ViT-B/32) -> cluster (k=1000) -> score (ssp, random) -> select (keep the hardest
70%, at least 10% of the budget spread over clusters) -> manifest. The paper beat power-law scaling on
ImageNet with SwAV prototypes; keep hard with abundant data, easy when the kept set is small.

    python -m datapruning.pipelines.ssp --input 'shards/{00000..00099}.tar' --output runs/ssp
    python -m datapruning.pipelines.ssp --precomputed --input embeddings/ --output runs/ssp
"""
import sys

from .recipe import main as run_recipe


def main(argv=None) -> int:
    return run_recipe("ssp", __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
