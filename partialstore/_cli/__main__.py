"""``python -m partialstore._cli``: the ``partialstore`` command without the console script."""

from __future__ import annotations

import sys

from partialstore._cli.cli import main

sys.exit(main())
