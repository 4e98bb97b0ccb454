"""Thin wrapper over the packaged recipe: same as python -m datapruning.pipelines.ssp."""
import sys

from datapruning.pipelines.ssp import main

if __name__ == "__main__":
    sys.exit(main())
