"""fl-sim's clients: local training and the Flower ClientApp."""
