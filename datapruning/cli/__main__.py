"""``python -m datapruning.cli``: the same as the ``datapruning`` command."""
import sys

from . import main

sys.exit(main())
