"""Thin wrapper over the packaged recipe: same as python -m datapruning.pipelines.clip_dbp."""
import sys

from datapruning.pipelines.clip_dbp import main

if __name__ == "__main__":
    sys.exit(main())
