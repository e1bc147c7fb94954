"""The test-only rendezvous that makes the two-node placement test independent of timing."""

from __future__ import annotations

import threading
import time

import pytest

from search.faults import barrier


def test_first_parties_wait_for_each_other_and_later_ones_pass(tmp_path):
    arrived, passed_at = [], []

    def party(delay):
        time.sleep(delay)
        arrived.append(barrier(str(tmp_path), 2, timeout_s=30))
        passed_at.append(time.monotonic())

    t0 = time.monotonic()
    first = threading.Thread(target=party, args=(0.0,))
    first.start()
    time.sleep(0.5)
    assert first.is_alive()  # alone at the barrier: still waiting
    party(0.0)
    first.join(10)
    assert sorted(arrived) == [1, 2] and min(passed_at) - t0 >= 0.5
    start = time.monotonic()
    assert barrier(str(tmp_path), 2, timeout_s=30) == 3  # a third arrival does not wait
    assert time.monotonic() - start < 0.5


def test_a_missing_party_times_out_with_a_message(tmp_path):
    with pytest.raises(TimeoutError, match="1 of 2 trials arrived"):
        barrier(str(tmp_path / "b"), 2, timeout_s=0.3)
