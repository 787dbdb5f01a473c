"""`python -m btx` is the `btx` command."""

import sys

from btx.cli import main

sys.exit(main())
