"""``python -m flows`` runs the ``unlearn`` command (same module object as the script)."""

import sys

from flows.cli import main

sys.exit(main())
