"""`python -m fsrepo.cli`: how the detached mount process (and the tests) run the command."""

import sys

from . import main

sys.exit(main())
