"""`python -m minipaged`: the same command line as the `minipaged` console script (see cli.py)."""

from __future__ import annotations

from minipaged.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
