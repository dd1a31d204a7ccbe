"""``python -m export_engine`` runs the CLI (for machines where the console script is not installed)."""

import sys

from export_engine.cli import main

sys.exit(main())
