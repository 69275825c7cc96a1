"""``python -m fl_patch`` is the ``fl-patch`` command."""

import sys

from fl_patch.cli import main

sys.exit(main())
