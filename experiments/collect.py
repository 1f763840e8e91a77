#!/usr/bin/env python
"""Kept for the commands in experiments/*.md: the collector is `anomalib-lite-collect` (anomalib_lite/collect.py)."""

import sys

from anomalib_lite.collect import main

if __name__ == "__main__":
    sys.exit(main())
