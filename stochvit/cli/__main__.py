"""`python -m stochvit.cli ...`: the same command line as `stochvit ...`."""

import sys

from . import main

sys.exit(main())
