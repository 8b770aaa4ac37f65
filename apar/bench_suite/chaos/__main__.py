import sys

from apar.bench_suite.chaos.cli import main

sys.exit(main())
