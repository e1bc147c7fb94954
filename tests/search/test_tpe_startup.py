"""TPE's random start-up scales with the budget, so a small campaign's TPE actually models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from search.campaign import Budget
from search.searcher import make_sampler


@pytest.mark.parametrize("num_samples, points, expected", [
    (10, 4, 5),    # the evidence campaigns: 4 starting points + 1 random draw, then 5 modelled trials
    (6, 4, 5),     # the demo
    (10, 0, 3),    # no starting points: a third of the budget
    (100, 4, 10),  # large budgets keep Optuna's default
    (30, 0, 10),
])
def test_auto_startup_trials(num_samples, points, expected):
    assert Budget(num_samples=num_samples).startup_trials(points) == expected


def test_explicit_startup_trials_win_and_negative_is_refused():
    assert Budget(num_samples=10, tpe_startup_trials=2).startup_trials(4) == 2
    with pytest.raises(ValidationError, match="tpe_startup_trials"):
        Budget(tpe_startup_trials=-1)


def test_sampler_models_after_its_startup_trials():
    """After ``startup`` complete trials TPE's relative sampling returns a model-based draw (non-empty)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(0, "tpe", startup_trials=3)
    assert sampler._n_startup_trials == 3
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def relative_draw(sampler):
        study = optuna.create_study(sampler=sampler, direction="maximize")
        for i in range(3):
            study.add_trial(optuna.trial.create_trial(params={"x": i / 3}, distributions=dist, value=float(i)))
        trial = study.ask()
        return sampler.sample_relative(study, trial, sampler.infer_relative_search_space(study, trial))

    assert relative_draw(sampler) != {}  # modelled after 3 trials
    default = make_sampler(0, "tpe")
    assert default._n_startup_trials == 10  # Optuna's default when nobody asks
    assert relative_draw(default) == {}  # still drawing at random after 3
