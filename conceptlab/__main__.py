"""``python -m conceptlab ...``: the command line (:mod:`conceptlab.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
