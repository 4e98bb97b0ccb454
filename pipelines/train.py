"""Thin wrapper over the packaged trainer: same as datapruning train (python -m datapruning.pipelines.train)."""
import sys

from datapruning.pipelines.train import command as main

if __name__ == "__main__":
    sys.exit(main())
