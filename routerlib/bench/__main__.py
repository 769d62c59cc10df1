"""`python -m routerlib.bench --help`: the benchmark sweep CLI (see routerlib.bench.sweep)."""

import sys

from routerlib.bench.sweep import main

if __name__ == "__main__":
    sys.exit(main())
