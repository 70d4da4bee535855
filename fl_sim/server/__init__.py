"""The malicious server: the strategy wrapper, the ServerApp, the active attacks' model surgery, reply checks,
checkpoints."""
