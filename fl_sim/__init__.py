"""fl-sim: a federated-learning simulator whose honest-but-curious server inverts every client's update."""
__version__ = "0.1.0"
