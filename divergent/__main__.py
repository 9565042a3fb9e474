"""``python -m divergent``: the same as the ``divergent`` command."""

import sys

from divergent.cli import main

sys.exit(main())
