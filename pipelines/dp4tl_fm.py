"""Thin wrapper over the packaged recipe: same as python -m datapruning.pipelines.dp4tl_fm."""
import sys

from datapruning.pipelines.dp4tl_fm import main

if __name__ == "__main__":
    sys.exit(main())
