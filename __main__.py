"""``python -m deepinsert``: the same as the ``deepinsert`` command."""

from __future__ import annotations

import sys

from deepinsert.cli import main

sys.exit(main())
