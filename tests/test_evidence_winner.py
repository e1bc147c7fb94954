"""bench/evidence.py reports the confirmed winner's test mean, the product's answer, when a
campaign confirmed one (it once read a field TargetResult never had, and reported the selected
search trial instead)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from search.results import TargetResult

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evidence_under_test", ROOT / "bench" / "evidence.py")
evidence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evidence)

TRIALS = [  # in start order: the second has the best selection value at the full budget
    {"start": 1, "epochs": 6, "val_top1": 0.90, "test_top1": 0.85},
    {"start": 2, "epochs": 6, "val_top1": 0.92, "test_top1": 0.84},
    {"start": 3, "epochs": 4, "val_top1": 0.95, "test_top1": None},  # pruned: no test value
]


def test_confirmed_winner_test_mean_is_reported():
    res = TargetResult("demo_net/w3a3", "t2", 0.92, "freeze", {}, {"COMPLETE": 2},
                       confirmed={"trial_id": "t1", "test_top1_mean": 0.861, "test_top1_std": 0.004})
    assert evidence._winner_test(res, TRIALS) == 0.861
    assert evidence._selected_test(TRIALS) == 0.84


def test_without_a_confirm_stage_the_selected_trial_is_reported():
    res = TargetResult("demo_net/w3a3", "t2", 0.92, "freeze", {}, {"COMPLETE": 2})
    assert evidence._winner_test(res, TRIALS) == 0.84
