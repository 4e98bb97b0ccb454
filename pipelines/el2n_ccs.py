"""Thin wrapper over the packaged recipe: same as python -m datapruning.pipelines.el2n_ccs."""
import sys

from datapruning.pipelines.el2n_ccs import main

if __name__ == "__main__":
    sys.exit(main())
