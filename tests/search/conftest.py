"""Fixtures for the search-layer tests (real Ray, MLflow and Optuna; tiny campaigns)."""

from __future__ import annotations

import pytest

from searchtest_utils import make_fp_checkpoint, short_ray_tmpdir, stop_ray_leftovers, write_space


@pytest.fixture
def ray_tmp():
    """A private RAY_TMPDIR; Ray processes still running from it are killed (by PID) afterwards."""
    path = short_ray_tmpdir()
    try:
        yield path
    finally:
        stop_ray_leftovers(path)


@pytest.fixture
def space_file(tmp_path):
    return write_space(tmp_path)


@pytest.fixture(scope="session")
def fp_checkpoint(tmp_path_factory):
    """One FP checkpoint of the demo net for campaigns that don't test the FP pretraining step."""
    return make_fp_checkpoint(tmp_path_factory.mktemp("fp") / "demo_net_fp.pt")
