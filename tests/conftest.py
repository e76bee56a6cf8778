"""Shared test setup."""

import torch

# the tests train tiny models: one thread avoids oversubscribing the two cores CI has (10x faster steps here)
torch.set_num_threads(1)
