"""``python -m linewatch.cli``: the same as the ``linewatch`` command."""

import sys

from linewatch.cli import main

sys.exit(main())
