"""Thin wrapper over the packaged recipe: same as python -m datapruning.pipelines.random_kd."""
import sys

from datapruning.pipelines.random_kd import main

if __name__ == "__main__":
    sys.exit(main())
