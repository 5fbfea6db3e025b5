"""``python -m jobs.cli``: the ``tal`` command where the console script is not installed (e.g. a Ray job's entrypoint)."""

import sys

from jobs.cli import main

sys.exit(main())
