"""The `fl-sim` command line: one module per sub-command, and the flags they share."""
