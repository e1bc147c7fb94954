"""Data splits: train / selection / test (fixed test split, train-only normalisation), digits_hard."""

from __future__ import annotations

import pytest
import torch

from oscqat import TrainConfig
from oscqat.data import build_data, loader_workers, three_way_split
from oscqat.digits_hard import VARIANTS, digits_hard_splits, rendered_digits

SEEDS = (0, 1, 7, 123)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


def test_three_way_split_is_disjoint_and_test_is_fixed_across_seeds():
    tests = []
    for seed in SEEDS:
        train, sel, test = three_way_split(1797, 0.2, seed)
        assert len(train) + len(sel) + len(test) == 1797
        assert len(set(train.tolist()) | set(sel.tolist()) | set(test.tolist())) == 1797
        tests.append(test)
    assert all(torch.equal(t, tests[0]) for t in tests)
    assert not torch.equal(three_way_split(1797, 0.2, 0)[1], three_way_split(1797, 0.2, 1)[1])


@pytest.mark.parametrize("dataset", ["digits", "digits_hard"])
def test_bundle_splits_are_disjoint_and_test_fixed(dataset):
    """Images (not just indices) of the loaders: disjoint for each seed; test identical for every seed."""
    test_sets = []
    for seed in SEEDS[:3]:
        data = build_data(TrainConfig(dataset=dataset, seed=seed))
        # one bundle standardises all three splits with the same (train) statistics, so equal rows = equal images
        train, sel, test = (_rows(loader.x) for loader in (data.train, data.val, data.test))
        assert not train & sel and not train & test and not sel & test
        test_sets.append(data.test.y)
        assert data.test.num_samples > 300
    assert all(torch.equal(t, test_sets[0]) for t in test_sets)


def test_normalisation_uses_train_split_only():
    data = build_data(TrainConfig(dataset="digits", seed=0))
    x = data.train.x
    assert x.mean().abs() < 1e-5 and (x.std() - 1).abs() < 1e-3
    assert data.test.x.mean().abs() > 1e-4  # test standardised with train's stats, not its own


def test_digits_hard_test_sources_are_fixed_and_disjoint_from_training_sources():
    """No test rendering is a distortion of a digit any seed trains or selects on."""
    x, _ = rendered_digits()
    assert len(x) == 1797 * VARIANTS
    for seed in SEEDS:
        tr, sel, te = three_way_split(1797, 0.2, seed)
        assert not set(te.tolist()) & (set(tr.tolist()) | set(sel.tolist()))
    a = digits_hard_splits(None, 1, 0.2, 0)
    b = digits_hard_splits(None, 1, 0.2, 5)
    assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])
    assert not torch.equal(a[2][:50], b[2][:50])


def test_digits_hard_is_deterministic_and_distorted():
    from oscqat.digits_hard import render
    from oscqat.data import load_digits_tensors

    src, _ = load_digits_tensors(None, 1)
    one, two = render(src[:32], 24, 3), render(src[:32], 24, 3)
    assert torch.equal(one, two)
    assert not torch.equal(one, render(src[:32], 24, 4))
    assert one.shape == (32, 1, 24, 24)
    data = build_data(TrainConfig(dataset="digits_hard", arch="resnet18", image_size=16))
    assert data.train.x.shape[1:] == (3, 16, 16) and data.image_size == 16


def test_selection_fraction_and_its_old_name():
    assert TrainConfig(val_fraction=0.3).selection_fraction == 0.3
    assert TrainConfig(selection_fraction=0.1).selection_fraction == 0.1
    assert "val_fraction" not in TrainConfig().model_dump()
    n_sel = build_data(TrainConfig(dataset="digits", selection_fraction=0.1)).val.num_samples
    assert n_sel == round((1797 - round(1797 * 0.2)) * 0.1)


def test_cpu_data_path_is_unchanged_and_workers_follow_the_device():
    """On a CPU the in-memory loaders stay where they are (no pinning, no copies), and file-backed
    sets get no DataLoader workers unless asked for: a CPU run's results and cost are as before."""
    cfg = TrainConfig(dataset="digits", device="cpu", batch_size=64)
    data = build_data(cfg)
    before = [(x.clone(), y.clone()) for x, y in data.train]
    assert data.train.stage(torch.device("cpu")) == "host"
    assert not data.train.pin and data.train.x.device.type == "cpu"
    after = list(data.train)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))
    assert loader_workers(cfg) == 0
    assert loader_workers(TrainConfig(dataset="digits", device="cpu", num_workers=3)) == 3
