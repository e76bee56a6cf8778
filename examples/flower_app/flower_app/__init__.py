"""FedHarmony on Flower: a ServerApp and a ClientApp around lightning-fedharmony."""
