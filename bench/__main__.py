"""`python -m bench [scenario …|all]` (make bench SCENARIO=…)."""

import sys

from bench.harness import run

sys.exit(run(sys.argv[1:]))
