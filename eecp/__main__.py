"""``python -m eecp`` is the ``eecp`` command."""

import sys

from eecp.cli import main

sys.exit(main())
