"""`python -m fl_sim` is the `fl-sim` command."""
import sys

from .cli import main

sys.exit(main())
