"""``python -m bnbench``: the same as the ``bnbench`` console script."""

import sys

from bnbench.cli import main

sys.exit(main())
