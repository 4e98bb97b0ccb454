"""``python -m datapruning``: the same as the ``datapruning`` command."""
import sys

from .cli import main

sys.exit(main())
