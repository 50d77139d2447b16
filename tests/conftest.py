"""Shared test setup: one torch thread (the machine has 2 cores and small models thrash with more)."""

import torch

torch.set_num_threads(1)
