"""The paper's toy regression (METHOD.md section 6) through the real quantizer, tracker and losses."""

from __future__ import annotations

import numpy as np
import pytest

from oscqat.toy import TOY_METHODS, run_toy

W_STAR, SCALE, STEPS = 0.234, 0.1, 600  # grid points 0.2 / 0.3, threshold 0.25, 34% of time up


@pytest.fixture(scope="module")
def lsq():
    return run_toy(w_star=W_STAR, method="lsq", steps=STEPS, scale=SCALE, seed=0)


@pytest.fixture(scope="module")
def frozen():
    return run_toy(w_star=W_STAR, method="freeze", steps=STEPS, scale=SCALE, seed=0)


@pytest.fixture(scope="module")
def dampened():
    return run_toy(w_star=W_STAR, method="dampen", steps=STEPS, scale=SCALE, seed=0)


def test_result_shapes_and_grid(lsq):
    assert lsq.steps == STEPS
    for arr in (lsq.latent, lsq.q, lsq.w_int, lsq.freq, lsq.frozen, lsq.loss):
        assert isinstance(arr, np.ndarray) and arr.shape == (STEPS,)
    assert lsq.grid_down == pytest.approx(0.2) and lsq.grid_up == pytest.approx(0.3)
    assert lsq.threshold == pytest.approx(0.25)
    assert lsq.expected_up_fraction == pytest.approx(0.34)
    np.testing.assert_allclose(lsq.q, lsq.w_int * SCALE)
    # q is the quantized latent weight (nothing frozen in plain LSQ)
    np.testing.assert_allclose(lsq.q, np.clip(np.round(lsq.latent / SCALE), -8, 7) * SCALE, atol=1e-9)


def test_lsq_oscillates_around_the_rounding_threshold(lsq):
    half = STEPS // 2
    # only the two grid points bracketing w_star are visited, and they alternate many times
    assert set(np.round(lsq.q[half:], 6)) == {0.2, 0.3}
    assert lsq.flips(half) > 100
    # the latent weight hugs the threshold instead of converging to w_star
    assert np.abs(lsq.latent[half:] - lsq.threshold).max() < 0.1 * SCALE
    assert np.abs(lsq.latent[half:] - W_STAR).min() > 0.1 * SCALE
    # the time average of q approaches w_star: ~34% of the time in the upper state
    assert lsq.time_average_q(half) == pytest.approx(W_STAR, abs=0.05 * SCALE)
    assert lsq.up_fraction(half) == pytest.approx(lsq.expected_up_fraction, abs=0.05)
    # the tracker sees it: frequency EMA well above any freezing threshold used in practice
    assert lsq.freq[half:].min() > 0.3
    assert not lsq.frozen.any()


def test_lsq_time_average_tracks_other_targets():
    res = run_toy(w_star=-0.17, method="lsq", steps=400, scale=SCALE, seed=1)
    assert res.grid_down == pytest.approx(-0.2)
    assert set(np.round(res.q[200:], 6)) == {-0.2, -0.1}
    assert res.time_average_q(200) == pytest.approx(-0.17, abs=0.05 * SCALE)


def test_freezing_stops_on_the_majority_grid_point(lsq, frozen):
    # the weight oscillated like plain LSQ before freezing started (25% of training) ...
    start = int(0.25 * STEPS)
    assert frozen.flips(0) > 20 and not frozen.frozen[: start].any()
    # ... then froze right away and never moved again
    first = int(np.argmax(frozen.frozen))
    assert start <= first < start + 20
    assert frozen.frozen[first:].all()
    assert frozen.flips(first + 1) == 0
    assert np.all(frozen.latent[first + 2:] == frozen.latent[first + 2])
    # on the grid point that held the weight most of the time (0.2 here, also nearest to w_star)
    held = frozen.q[first + 1:]
    majority = 0.3 if lsq.up_fraction(0) > 0.5 else 0.2
    assert np.all(np.round(held, 6) == majority) and majority == 0.2
    majority_before = 0.3 if (frozen.q[:first] > frozen.threshold).mean() > 0.5 else 0.2
    assert majority_before == 0.2


def test_freezing_follows_the_majority_state_upwards():
    """With w_star closer to the upper grid point the weight freezes there instead."""
    res = run_toy(w_star=0.271, method="freeze", steps=400, scale=SCALE, seed=2)
    first = int(np.argmax(res.frozen))
    assert res.frozen[-1] and res.flips(first + 1) == 0
    assert np.round(res.q[-1], 6) == 0.3


def test_dampening_stops_the_oscillation(lsq, dampened):
    tail = int(0.6 * STEPS)  # the lambda ramp (from 25%) is strong enough by then
    assert dampened.flips(tail) == 0
    assert lsq.flips(tail) > 100
    assert dampened.flips(0) < lsq.flips(0) // 2
    # the latent weight moved away from the threshold into its bin
    assert np.abs(dampened.latent[-100:] - dampened.threshold).min() > 0.2 * SCALE
    assert dampened.dampen_lambda[0] == 0.0 and dampened.dampen_lambda[-1] == pytest.approx(1.0, abs=1e-3)
    assert not dampened.frozen.any()


def test_toy_is_deterministic_and_validates_method():
    a = run_toy(method="dampen+freeze", steps=150, seed=5)
    b = run_toy(method="dampen+freeze", steps=150, seed=5)
    np.testing.assert_array_equal(a.latent, b.latent)
    assert set(TOY_METHODS) == {"lsq", "dampen", "freeze", "dampen+freeze"}
    with pytest.raises(ValueError):
        run_toy(method="sgd")
