"""`python -m scripts.bench [options]` (scripts/bench.sh runs it with the project's venv)."""

import sys

from .cli import main

sys.exit(main())
