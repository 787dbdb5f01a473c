#!/usr/bin/env python
"""Routing analysis of any Mixtral-format checkpoint: `btx analyze` as a standalone script.

    python tools/routing_analysis.py CHECKPOINT --data code=code.jsonl --data math=val.bin [--show-text]
    python tools/routing_analysis.py --help

Everything (arguments, statistics, output) is btx's own `btx analyze`; this file only lets the
tool run from a source checkout without installing the `btx` command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the btx package next to tools/

from btx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
