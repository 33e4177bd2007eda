"""``python -m vmconfine_aa_helper``: the same as the ``vmconfine-aa-helper`` command."""

import sys

from vmconfine_aa_helper.main import main

sys.exit(main())
