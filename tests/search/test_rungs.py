"""Remedy-aware ASHA rungs: the grace period follows the latest remedy start the space samples."""

from __future__ import annotations

import pytest

from search.campaign import Budget, Campaign
from search.rungs import first_safe_rung, latest_remedy_start, resolve_grace, rung_epochs
from spaces import load_space


def test_first_safe_rung_is_one_full_epoch_after_the_latest_start():
    assert first_safe_rung(0.25, 8) == 3  # remedy from epoch 2.0: epoch 3 is the first fully active one
    assert first_safe_rung(0.3, 8) == 4  # from epoch 2.4: epoch 3 is only partly active
    assert first_safe_rung(0.5, 8) == 5
    assert first_safe_rung(0.95, 8) == 8  # never before the full budget
    assert first_safe_rung(None, 8) == 1  # no remedy: ASHA may stop from epoch 1


def test_rung_epochs_match_ray_asha_spacing():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in [(1, 2, 8), (2, 2, 8), (3, 2, 10), (5, 3, 50), (4, 2, 8)]:
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs if m < max_t)
        assert rung_epochs(grace, rf, max_t) == ray_rungs


def test_latest_start_reads_the_space_range_and_the_methods():
    space = load_space("demo_net", "w3a3")
    # dampen_start samples up to 0.5, freeze_start up to 0.5 in the shipped demo space
    assert latest_remedy_start(space, {}) == pytest.approx(max(space.params["dampen_start"].high,
                                                                space.params["freeze_start"].high))


def test_latest_start_is_none_when_no_method_uses_a_remedy():
    class LsqOnly:
        params = {}

    assert latest_remedy_start(LsqOnly(), {"method": "lsq"}) is None
    # a fixed remedy method in base uses base's (or the default) start
    assert latest_remedy_start(LsqOnly(), {"method": "freeze", "freeze_start": 0.4}) == 0.4


def test_explicit_early_grace_is_refused_unless_allowed():
    budget = Budget(max_epochs=8, grace_period=2)
    with pytest.raises(ValueError, match="grace_period.*first rung must be at epoch 5"):
        resolve_grace(budget, 0.5)
    assert resolve_grace(Budget(max_epochs=8, grace_period=2, allow_early_rungs=True), 0.5) == 2
    assert resolve_grace(Budget(max_epochs=8), 0.5) == 5  # auto
    assert resolve_grace(Budget(max_epochs=8, grace_period=6), 0.5) == 6


def test_search_run_refuses_an_early_grace_before_writing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import yaml
    from oscqat_cli import app

    monkeypatch.chdir(tmp_path)
    camp = {"name": "early", "targets": [{"arch": "demo_net", "bits": "w3a3"}],
            "budget": {"num_samples": 2, "max_epochs": 8, "grace_period": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(camp))
    result = CliRunner().invoke(app, ["search", "run", "c.yaml"])
    assert result.exit_code == 2, result.output
    assert "budget.grace_period" in result.output and "allow_early_rungs" in result.output
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    Campaign.model_validate(camp)  # the file itself is valid: only the rung rule refuses it
