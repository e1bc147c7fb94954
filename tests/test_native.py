"""The tracker's native CPU loops (oscqat.native): bit-identical to the torch ops, built once
per source and compiler, and a clean fallback to torch when they cannot be built."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oscqat import OscillationTracker, QuantConfig, native, quant_layers, quantize_model


needs_cc = pytest.mark.skipif(native._compiler() is None,
                              reason="no C compiler here: the tracker uses its torch ops (tested everywhere)")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """``oscqat.native`` as in a new process, caching into an empty directory."""
    monkeypatch.setenv("OSCQAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OSCQAT_NATIVE", raising=False)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_loaded", None)
    return tmp_path / "cache"


def _mixed_model(per_channel: bool) -> nn.Module:
    """A 3-bit conv, a 3-bit depthwise conv and an 8-bit linear: int16 integers (max_bits 8),
    layers of different grids and, per channel, different scale entries per index."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 5))
    quantize_model(model, QuantConfig(weight_bits=3, act_bits=4, per_channel=per_channel))
    model[4].weight_quantizer.bits = 8
    return model


@needs_cc
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("live", [False, True], ids=["recorded", "observe"])
def test_native_and_torch_trackers_stay_bit_identical_through_training(per_channel, live):
    """Two twins trained side by side, one tracker on the native loops and one on torch ops:
    after every step the integers, frequencies, directions, integer EMAs, frozen masks, weights
    and scale-flip counts are equal bit for bit, with moves dense early (large lr) and sparse
    late, freezing on, and attribution from the live weights (``observe``, as a compiled step
    does) or from the recorded ``x / s``."""
    model = _mixed_model(per_channel)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    runs = []
    for use_native, net in ((False, model), (True, twin)):
        tracker = OscillationTracker(net, momentum=0.1, max_bits=8)
        tracker.use_native = use_native
        runs.append((net, tracker, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)))
    assert runs[1][1]._int_dtype == torch.int16
    assert runs[1][1]._native_lib(runs[1][1]._freq) is not None, "this machine should build the native loops"
    assert runs[0][1]._native_lib(runs[0][1]._freq) is None
    if live:
        for _, tracker, _ in runs:
            for layer in tracker.layers.values():
                layer.weight_quantizer.record_forward = False
    scale_driven = oscillated = 0
    for step in range(60):
        for net, tracker, opt in runs:
            for group in opt.param_groups:
                group["lr"] = 0.5 if step < 10 else 0.02
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if live:
                tracker.observe()
            opt.step()
            tracker.step(freeze_threshold=0.12 if step >= 5 else 0.0)
        (a_net, a, _), (b_net, b, _) = runs
        assert torch.equal(a._prev, b._prev), step
        for name in a.states:
            for key in ("freq", "last_dir", "int_ema"):
                assert torch.equal(getattr(a.states[name], key), getattr(b.states[name], key)), (step, name, key)
        for (_, la), (_, lb) in zip(quant_layers(a_net), quant_layers(b_net)):
            assert torch.equal(la.frozen_mask, lb.frozen_mask), step
            assert torch.equal(la.weight, lb.weight), step
        flips = a.pop_flip_stats()
        assert flips == b.pop_flip_stats(), step
        scale_driven += flips[0]
        oscillated += int(b._flipped[1].sum()) if b._flipped is not None else 0
    assert scale_driven > 0 and oscillated > 0  # attribution and oscillation were exercised
    assert runs[1][1].summary()["frozen_frac"] > 0.01


def test_native_off_by_environment_uses_torch_ops(monkeypatch, fresh_native):
    monkeypatch.setenv("OSCQAT_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert native.load() is None
        tracker = OscillationTracker(_mixed_model(False), max_bits=8)
        assert tracker._native_lib(tracker._freq) is None
    assert not fresh_native.exists()  # nothing was built


def _fake_compiler(directory, body: str) -> str:
    path = directory / "fakecc"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failed_build_warns_once_falls_back_and_leaves_nothing(monkeypatch, fresh_native, tmp_path):
    cc = _fake_compiler(tmp_path, 'echo "tracker.c:1: error: imaginary failure" >&2; exit 1')
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no cc, gcc or clang to fall back to
    with pytest.warns(RuntimeWarning, match="imaginary failure"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None  # warned once per process
    assert list(fresh_native.iterdir()) == []  # no half-written library or temp file
    model = _mixed_model(False)
    tracker = OscillationTracker(model, max_bits=8)
    assert tracker._native_lib(tracker._freq) is None
    for _ in range(3):  # the torch ops carry on
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        tracker.step()
    assert tracker.steps == 3


def test_no_compiler_is_a_named_reason(monkeypatch, fresh_native, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.load() is None


@needs_cc
def test_the_build_is_cached_and_concurrent_builds_agree(monkeypatch, fresh_native):
    """Trials of one campaign start together: their builds race for the same name and each
    must end with a complete library (write to a temp name, then rename); a later process finds
    the cached build and runs no compiler."""
    paths, errors = [], []

    def build():
        try:
            paths.append(native.build())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    built = paths[0]
    assert built.parent == fresh_native and [p.name for p in fresh_native.iterdir()] == [built.name]

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build() == built
    lib = native.load()
    assert lib is not None and os.path.samefile(lib._name, built)
