"""The contract between server, clients and attacker: message keys, training settings, the run config and the
row vocabulary. Standard library only."""
