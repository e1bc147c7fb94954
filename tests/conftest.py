"""Suite-wide settings for the fast CPU tests."""

from __future__ import annotations

import pytest
import torch

# Tiny tensors gain nothing from intra-op threads, and on a busy (shared) machine OpenMP's
# spinning barriers make 2 threads 10-20x slower than 1 for these models.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path_factory, monkeypatch):
    """``oscqat train`` without --out writes its default run directory here, not into the worktree."""
    monkeypatch.setenv("OSCQAT_RUNS_DIR", str(tmp_path_factory.mktemp("runs")))
