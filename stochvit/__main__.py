"""`python -m stochvit ...` (and `torchrun -m stochvit train ...`) run the command line."""

import sys

from stochvit.cli import main

sys.exit(main())
