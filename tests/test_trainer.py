"""Trainer: resumable state, a short W3A3 demo run, FP -> QAT, non-finite losses."""

from __future__ import annotations

import pytest
import torch

from oscqat_helpers import DEMO_CONFIG, tiny_train_kwargs
from oscqat import METRIC_NAMES, NonFiniteLossError, TrainConfig, Trainer, layer_bits, quant_layers

TIMING_METRICS = {"epoch_time_s", "samples_per_s", "compile_time_s"}


def _resume_cfg(**overrides) -> TrainConfig:
    """dampen+freeze with schedules that start at once, so freezing happens in the first epoch."""
    kw = tiny_train_kwargs(
        method="dampen+freeze", epochs=2, dampen_start=0.0, freeze_start=0.0, osc_momentum=0.05,
        freeze_threshold_start=0.05, freeze_threshold_end=0.02, dampen_lambda=0.1,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def test_save_resume_equals_uninterrupted_run(tmp_path):
    cfg = _resume_cfg()
    straight = Trainer(cfg)
    full = straight.fit()
    assert [m["epoch"] for m in full] == [1, 2]

    first = Trainer(cfg)
    m1 = first.run_epoch()
    assert m1["frozen_frac"] > 0, "no weight froze in epoch 1: the resume test would not cover freezing"
    torch.rand(100)  # stands in for RNG use during training (dropout in the torchvision archs)
    rng = torch.get_rng_state()
    ckpt = first.save(tmp_path / "run" / "checkpoint.pt")
    del first
    torch.manual_seed(12345)  # disturb the global RNG: load must restore it (dropout in other archs)
    resumed = Trainer.load(ckpt)
    assert torch.equal(torch.get_rng_state(), rng)
    assert resumed.epoch == 1 and resumed.global_step == resumed.steps_per_epoch
    m2 = resumed.run_epoch()
    assert resumed.done
    history = resumed.history
    assert len(history) == 2
    assert full[1]["frozen_frac"] >= full[0]["frozen_frac"] > 0

    for epoch, (a, b) in enumerate(zip(full, history), start=1):
        assert set(a) == set(METRIC_NAMES) == set(b)
        for name in METRIC_NAMES:
            if name in TIMING_METRICS:
                continue
            if a[name] is None:  # the test split is measured at the last epoch only
                assert b[name] is None, (epoch, name)
                continue
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), (epoch, name)
    assert history[1] is m2
    # the models themselves are identical: weights, scales, frozen masks and integers, BN stats
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ta, tb = straight.tracker.state_dict(), resumed.tracker.state_dict()
    assert ta["steps"] == tb["steps"] == 2 * straight.steps_per_epoch
    for name in ta["layers"]:
        assert torch.equal(ta["layers"][name]["freq"], tb["layers"][name]["freq"]), name


def test_tracker_counts_training_steps_only():
    trainer = Trainer(_resume_cfg(epochs=1, method="lsq"))
    trainer.run_epoch()  # includes two evaluations and a BN re-estimation pass
    assert trainer.tracker.steps == trainer.steps_per_epoch == trainer.global_step
    freq = {n: s.freq.clone() for n, s in trainer.tracker.states.items()}
    assert any(f.sum() > 0 for f in freq.values())
    trainer.evaluate()
    trainer.evaluate()
    for name, state in trainer.tracker.states.items():
        assert torch.equal(state.freq, freq[name]), "evaluation changed the oscillation frequencies"


def test_short_w3a3_demo_run_reaches_sensible_accuracy():
    cfg = TrainConfig.from_yaml(DEMO_CONFIG, epochs=3, device="cpu")
    assert cfg.bits == "w3a3" and cfg.method == "dampen+freeze"
    trainer = Trainer(cfg)
    bits = layer_bits(trainer.model)
    body = {n: b for n, b in bits.items() if n not in ("stem.0", "classifier")}
    assert body and all(b == (3, 3) for b in body.values())
    history = trainer.fit()
    final = history[-1]
    assert set(final) == set(METRIC_NAMES)
    assert final["val_top1"] >= 0.85, history  # 10 classes: chance is 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert final["dampen_lambda"] > 0 and final["freeze_threshold"] > 0
    for m in history:
        for name in METRIC_NAMES:
            if m is not final and name.startswith("test_"):  # the test split: last epoch only
                assert m[name] is None, name
                continue
            assert isinstance(m[name], (int, float)) and m[name] == m[name], name  # no NaN


def test_fp_training_then_qat_from_its_saved_model(tmp_path):
    fp_cfg = TrainConfig(**tiny_train_kwargs(bits="fp32", epochs=2))
    fp = Trainer(fp_cfg)
    assert fp.tracker is None and fp.quant_optimizer is None
    assert not list(quant_layers(fp.model))
    fp_hist = fp.fit()
    assert fp_hist[-1]["val_top1"] >= 0.85
    assert fp_hist[-1]["osc_frac"] == 0.0 and fp_hist[-1]["dampen_loss"] == 0.0
    path = fp.save_model(tmp_path / "fp" / "model.pt")

    qat_cfg = TrainConfig(**tiny_train_kwargs(bits="w4a4", epochs=1, method="freeze", pretrained=str(path)))
    qat = Trainer(qat_cfg)
    fp_state = fp.model.state_dict()
    for name, layer in quant_layers(qat.model):  # the float weights were loaded, then quantized
        assert torch.equal(layer.weight.detach(), fp_state[name + ".weight"]), name
    # before any QAT step the quantized model already classifies well (starts from FP, not scratch)
    _, top1_start = qat.evaluate()
    assert top1_start >= 0.5
    metrics = qat.run_epoch()
    assert metrics["val_top1"] >= 0.85


def test_absurd_learning_rate_raises_non_finite_loss():
    # lr 10 with weight decay 1 and momentum 0.9 grows the latent weights ~10x per step: inf, then NaN
    cfg = TrainConfig(**tiny_train_kwargs(bits="w4a4", lr=10.0, weight_decay=1.0, momentum=0.9, batch_size=16,
                                          epochs=1, lr_schedule="constant"))
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        trainer.run_epoch()
    assert trainer.global_step < trainer.steps_per_epoch


def test_quantizer_lr_0_05_on_the_demo_w3a3_config_fails_loudly_or_learns():
    """Adam at 0.05 takes the 8-bit classifier scales (~0.005) across 0 at the first step; before
    the floor check that run trained to chance (8.6%) without any error."""
    from oscqat import QuantizerCollapseError

    cfg = TrainConfig.from_yaml(DEMO_CONFIG, quantizer_lr=0.05, device="cpu")
    assert cfg.bits == "w3a3"
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    except QuantizerCollapseError as exc:
        assert exc.layers and all(name.endswith("_quantizer") for name in exc.layers)
        assert exc.layers[0] in str(exc) and "quantizer_lr 0.05" in str(exc)
        # the forward never saw a scale <= eps: evaluation after the collapse stays finite
        loss, _ = trainer.evaluate()
        assert loss == loss
    else:
        assert history[-1]["val_top1"] > 0.5, history[-1]


def test_scale_at_the_floor_ends_the_run_naming_the_layer():
    from oscqat import QuantizerCollapseError

    trainer = Trainer(TrainConfig(**tiny_train_kwargs(epochs=1)))
    trainer.model(next(iter(trainer.data.train))[0])  # calibrate
    q = trainer.model.get_submodule("classifier.input_quantizer")
    with torch.no_grad():
        q.scale.fill_(-1e-3)
    with pytest.raises(QuantizerCollapseError, match="classifier.input_quantizer") as info:
        trainer.run_epoch()
    assert "classifier.input_quantizer" in info.value.layers
    assert trainer.global_step == 0


def test_scale_flip_frac_is_reported_and_low_at_the_demo_quantizer_lr():
    trainer = Trainer(TrainConfig.from_yaml(DEMO_CONFIG, epochs=2, device="cpu"))
    history = trainer.fit()
    for m in history:
        assert 0.0 <= m["scale_flip_frac"] <= 1.0
    assert history[-1]["scale_flip_frac"] < 0.5, history  # oscillations are the weights' own


def test_test_split_is_measured_at_the_last_epoch_only():
    """test_top1 (with and without BN re-estimation) and test_loss: None before the last epoch, then
    the held-out split's numbers; val_top1 (selection) every epoch."""
    from oscqat.trainer import TEST_METRICS

    trainer = Trainer(TrainConfig(**tiny_train_kwargs(epochs=2)))
    first, last = trainer.fit()
    assert all(first[k] is None for k in TEST_METRICS)
    assert all(isinstance(last[k], float) for k in TEST_METRICS)
    assert 0.0 <= last["test_top1_no_bnre"] <= 1.0 and last["test_loss"] > 0
    loss, top1 = trainer.evaluate(trainer.data.test)  # the final model keeps the re-estimated BN statistics
    assert (loss, top1) == pytest.approx((last["test_loss"], last["test_top1"]))
    assert trainer.data.test.num_samples == round(1797 * 0.2)
    assert first["val_top1"] is not None


def test_memory_format_auto_is_nchw_on_the_cpu_and_channels_last_reaches_the_model():
    """``memory_format`` decides the layout of every image batch the model sees, in training
    and in evaluation; ``auto`` keeps NCHW on the CPU (channels_last is a CUDA default), and the
    layout changes no result beyond float reassociation."""
    from oscqat import TrainConfig, Trainer

    assert Trainer(TrainConfig(**tiny_train_kwargs())).channels_last is False
    seen = {}

    def run(fmt):
        torch.manual_seed(0)
        trainer = Trainer(TrainConfig(**tiny_train_kwargs(epochs=1, memory_format=fmt, method="dampen+freeze",
                                                          dataset="synthetic", image_size=8, dampen_start=0.0,
                                                          freeze_start=0.0)))
        layouts = seen.setdefault(fmt, set())

        def hook(_module, args):
            x = args[0]  # 3 channels: with one (digits) the two layouts are the same strides
            assert x.shape[1] == 3
            if len(x) == 1:  # oscqat.cost's one-image MAC count probe: shapes only
                return
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            layouts.add((channels_last, trainer.model.training))

        trainer.model.register_forward_pre_hook(hook)
        hist = trainer.fit()
        return hist[-1], trainer

    nchw, _ = run("contiguous")
    cl, trainer = run("channels_last")
    assert trainer.channels_last is True
    assert seen["contiguous"] == {(False, True), (False, False)}  # training and evaluation batches, NCHW
    assert seen["channels_last"] == {(True, True), (True, False)}  # the same, channels_last
    # a reassociated convolution sum can flip a rounding, so an epoch of QAT drifts a little
    assert cl["train_loss"] == pytest.approx(nchw["train_loss"], rel=1e-2)
    assert cl["val_top1"] == pytest.approx(nchw["val_top1"], abs=0.05)


def test_memory_format_must_be_a_known_name():
    from pydantic import ValidationError

    from oscqat import TrainConfig

    with pytest.raises(ValidationError, match="memory_format"):
        TrainConfig(**tiny_train_kwargs(memory_format="nhwc"))
