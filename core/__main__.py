"""``python -m vmconfine``: the command line."""

import sys

from vmconfine.cli import main

sys.exit(main())
