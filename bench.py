#!/usr/bin/env python3
"""Benchmark harness for biologically plausible learning rules: `python bench.py --help`."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
