"""Shared test setup: one torch thread (the machine has 2 cores and small models thrash with more)."""

import os
import tempfile

import torch

torch.set_num_threads(1)
# searched solvers saved by name go to a throwaway folder, never the user's ~/.cache/genkit/solvers
os.environ["GENKIT_SOLVERS"] = tempfile.mkdtemp(prefix="genkit-test-solvers-")
