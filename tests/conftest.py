"""Shared test setup: one torch thread (the machine has 2 cores and small models thrash with more)."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
# searched solvers saved by name go to a throwaway folder, never the user's ~/.cache/genkit/solvers
os.environ["GENKIT_SOLVERS"] = tempfile.mkdtemp(prefix="genkit-test-solvers-")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps per-process singletons; a test that builds an Accelerator starts from a clean one
    (test files that train use it for every test: pytestmark = pytest.mark.usefixtures(...))."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
