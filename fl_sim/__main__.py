"""`python -m fl_sim` is the `fl-sim` command."""
import sys

from fl_sim.commands.cli import main

sys.exit(main())
