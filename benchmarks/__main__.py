"""``python -m benchmarks``: list the benchmarks, run one, or regenerate the result tables."""

import sys

from benchmarks.frame import main

if __name__ == "__main__":
    sys.exit(main())
