"""`python -m spin_runtime` — the runtime CLI (see docs/runtime.md)."""

import sys

from spin_runtime.cli import main

sys.exit(main())
