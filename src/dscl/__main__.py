"""``python -m dscl`` (and ``torchrun -m dscl``) entry point."""

import sys

from dscl.cli import main

sys.exit(main())
