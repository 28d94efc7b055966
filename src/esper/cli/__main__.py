"""``python -m esper.cli``: the ``esper`` command (how ``torchrun`` starts each rank)."""

import sys

from esper.cli import main

sys.exit(main())
