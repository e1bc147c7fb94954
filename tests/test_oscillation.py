"""Oscillation tracking, freezing, dampening loss, schedules and BN re-estimation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oscqat import (OscillationTracker, QuantConfig, QuantConv2d, QuantLinear, create_model, dampening_loss,
                    quant_layers, quantize_model, reestimate_bn)
from oscqat import native
from oscqat.dampening import layer_dampening_loss
from oscqat.schedules import cosine_lr_factor, dampen_lambda_at, freeze_threshold_at


def _set_scale(layer, scale: float) -> None:
    with torch.no_grad():
        layer.weight_quantizer.scale.fill_(scale)
        layer.weight_quantizer.initialized.fill_(True)


# ----------------------------------------------------------------------------- tracker
def _feed(tracker, layer, sequence, freeze_threshold=0.0):
    """Drive the tracker with a hand-made sequence of integer weights (one tensor per step)."""
    for ints in sequence:
        layer.last_weight_int = torch.tensor(ints, dtype=torch.float32).view_as(layer.weight)
        tracker.step(freeze_threshold=freeze_threshold)


def test_tracker_flags_and_frequency_ema_hand_sequence():
    layer = QuantLinear(4, 1, bias=False, weight_bits=4)
    m = 0.5
    tracker = OscillationTracker(layer, momentum=m, max_bits=4)
    state = tracker.states[""]
    # four weights, nine steps:
    #  w0: 0 1 0 0 1 2 1 1 2   -> changes + - . + + - . +  -> oscillations at steps 2, 4, 6, 8
    #  w1: 0 0 0 0 0 0 0 0 0   -> never moves
    #  w2: 0 1 2 3 3 3 3 3 3   -> monotone: no oscillation
    #  w3: 0 2 1 1 1 1 1 1 3   -> +2 then -1 (oscillation: any size counts), later +2 (oscillation again)
    seq = [
        [0, 0, 0, 0], [1, 0, 1, 2], [0, 0, 2, 1], [0, 0, 3, 1], [1, 0, 3, 1],
        [2, 0, 3, 1], [1, 0, 3, 1], [1, 0, 3, 1], [2, 0, 3, 3],
    ]
    flags = [  # expected oscillation flag per update (steps 1..8)
        [0, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0],
        [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1],
    ]
    f = torch.zeros(4)
    _feed(tracker, layer, seq[:1])
    assert torch.equal(state.freq.view(-1), f)  # the first step only records the integers
    for ints, flag in zip(seq[1:], flags):
        _feed(tracker, layer, [ints])
        f = m * torch.tensor(flag, dtype=torch.float32) + (1 - m) * f
        torch.testing.assert_close(state.freq.view(-1), f, rtol=0, atol=1e-7)
    # closed-form check of w0's EMA: flags 0,1,0,1,0,1,0,1 with m = 0.5
    assert state.freq.view(-1)[0].item() == pytest.approx(0.6640625)
    assert state.freq.view(-1)[1].item() == 0.0 and state.freq.view(-1)[2].item() == 0.0
    assert state.last_dir.view(-1).tolist() == [1, 0, 1, 1]
    # the integer EMA: x_ema = m * x_int + (1 - m) * x_ema, seeded with the first integers
    ema = torch.tensor(seq[0], dtype=torch.float32)
    for ints in seq[1:]:
        ema = m * torch.tensor(ints, dtype=torch.float32) + (1 - m) * ema
    torch.testing.assert_close(state.int_ema.view(-1), ema)
    assert tracker.steps == len(seq)


def test_tracker_freezes_at_rounded_integer_ema():
    layer = QuantLinear(2, 1, bias=False, weight_bits=4)
    _set_scale(layer, 0.1)
    tracker = OscillationTracker(layer, momentum=0.2)
    # w0 oscillates 1,2,1,1,2,1,1,... (mostly 1); w1 stays at 3.
    seq = [[1 if i % 3 else 2, 3] for i in range(30)]
    _feed(tracker, layer, seq)
    assert not layer.frozen_mask.any()  # freeze_threshold 0 = no freezing
    f0 = tracker.states[""].freq.view(-1)[0].item()
    assert f0 > 0.3
    _feed(tracker, layer, [[1, 3]], freeze_threshold=0.3)
    assert layer.frozen_mask.view(-1).tolist() == [True, False]
    assert layer.frozen_int.view(-1)[0].item() == 1  # the majority state, not the last one
    assert layer._any_frozen
    assert layer.weight_int().view(-1)[0].item() == 1
    state = tracker.states[""]
    assert state.freq.view(-1)[0].item() == 0.0  # a frozen weight no longer oscillates
    _feed(tracker, layer, [[1, 3]] * 3)
    assert state.freq.view(-1)[0].item() == 0.0


def test_freezing_does_not_count_the_jump_to_the_pinned_integer():
    layer = QuantLinear(1, 1, bias=False, weight_bits=4)
    tracker = OscillationTracker(layer, momentum=0.1)
    # 2,3,2,3,... then freeze while the forward says 3: the EMA (2.32) pins it to 2, so the next
    # forward's integer jumps from 3 to 2, which is the freeze, not an oscillation.
    _feed(tracker, layer, [[[2]], [[3]], [[2]], [[3]], [[2]], [[3]]])
    state = tracker.states[""]
    _feed(tracker, layer, [[[3]]], freeze_threshold=0.1)
    assert layer.frozen_mask.item() and layer.frozen_int.item() == 2
    assert state.prev_int.item() == 2 and state.freq.item() == 0.0
    _feed(tracker, layer, [[[2]]] * 4)  # the forward now gives the pinned integer
    assert state.freq.item() == 0.0 and state.last_dir.item() == 0


class _DenseReference:
    """METHOD.md's tracking formulas, dense and literal, for one weight tensor."""

    def __init__(self, shape, m):
        self.m, self.f, self.d, self.ema, self.prev = m, torch.zeros(shape), torch.zeros(shape), None, None

    def step(self, ints):
        if self.prev is None:
            self.prev, self.ema = ints.clone(), ints.clone()
            return
        direction = torch.sign(ints - self.prev)
        osc = (direction != 0) & (direction == -self.d)
        self.d = torch.where(direction != 0, direction, self.d)
        self.f = self.m * osc.float() + (1 - self.m) * self.f
        self.ema = self.m * ints + (1 - self.m) * self.ema
        self.prev = ints.clone()

    def check(self, st):
        torch.testing.assert_close(st.freq, self.f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.int_ema, self.ema, rtol=1e-5, atol=1e-5)
        assert torch.equal(st.last_dir, self.d)


def test_tracker_matches_a_dense_reference_over_a_long_random_walk():
    """The scaled sparse update (and its periodic renormalisation) equals METHOD.md's dense EMAs."""
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(5, 3, bias=False, weight_bits=4), QuantLinear(3, 2, bias=False, weight_bits=3))
    m = 0.3  # decays below the renormalisation point every ~26 steps
    tracker = OscillationTracker(model, momentum=m)
    shapes = [model[0].weight.shape, model[1].weight.shape]
    ints = [torch.zeros(sh) for sh in shapes]
    ref = [_DenseReference(sh, m) for sh in shapes]
    for step in range(80):
        for i, layer in enumerate(model):
            ints[i] = (ints[i] + torch.randint(-1, 2, shapes[i]) * (torch.rand(shapes[i]) < 0.3)).clamp(-4, 3)
            layer.last_weight_int = ints[i].clone()
            ref[i].step(ints[i])
        tracker.step()
        if step % 7 == 0 or step == 79:
            for name, r in zip(("0", "1"), ref):
                r.check(tracker.states[name])
    assert tracker.states["0"].freq.max() > 0.2  # the walk did oscillate


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=pytest.mark.skipif(
    native._compiler() is None, reason="no C compiler here: the tracker uses its torch ops"))], ids=["torch", "native"])
@pytest.mark.parametrize("bits, int_dtype", [(4, torch.int8), (8, torch.int16)])
def test_sparse_move_search_matches_the_dense_reference(bits, int_dtype, use_native):
    """Large layers with few moves take the word search for moved integers (int64 words of the
    padded int8 (8 a word) or int16 (4 a word) buffers, their flags searched as blocks of 8
    words); it must find every move, in the last, padded word and at word and block edges.
    The native loops (``oscqat.native``) compare the same words in one pass."""
    torch.manual_seed(1)
    model = nn.Sequential(QuantLinear(300, 257, bias=False, weight_bits=bits),
                          QuantLinear(7, 3, bias=False, weight_bits=bits))
    numel = sum(layer.weight.numel() for layer in model)
    assert numel >= 1 << 16 and numel % 8  # big enough for the word search, with a padded last word
    m = 0.2
    tracker = OscillationTracker(model, momentum=m, max_bits=bits)
    tracker.use_native = use_native
    assert (tracker._native_lib(tracker._freq) is not None) == use_native  # this machine builds them
    tracker._moved_buf = torch.empty(16, dtype=torch.int64)  # the native search grows it when it overflows
    assert tracker._int_dtype == int_dtype
    shapes = [layer.weight.shape for layer in model]
    ints = [torch.zeros(sh) for sh in shapes]
    ref = [_DenseReference(sh, m) for sh in shapes]
    # word (8) and block (64) edges, and the big layer's last weight
    edges = torch.tensor([0, 7, 8, 63, 64, 127, 128, 511, 512, 77055, 77056, 77099])
    used_word_search = False
    for step in range(30):
        for i, layer in enumerate(model):
            moves = torch.randint(-1, 2, shapes[i]) * (torch.rand(shapes[i]) < 0.002)
            if i == 0 and step % 3 == 1:  # flip a fixed set back and forth: oscillations there
                moves.view(-1)[edges] = 1.0 if step % 6 == 1 else -1.0
            if i == 1:
                moves = torch.randint(-1, 2, shapes[i]).float()  # the tail: every weight moves
            ints[i] = (ints[i] + moves).clamp(-8, 7)
            layer.last_weight_int = ints[i].clone()
            ref[i].step(ints[i])
        used_word_search |= not tracker._dense_moves
        tracker.step()
        for name, r in zip(("0", "1"), ref):
            r.check(tracker.states[name])
    assert used_word_search or use_native, "the moves were never sparse enough to test the word search"
    assert float(tracker.states["0"].freq.view(-1)[edges].min()) > 0.2


def test_freezing_checks_only_flipped_weights_yet_matches_a_full_check():
    """While the threshold does not fall faster than the EMA decays, only weights that just
    oscillated can cross it; when it falls, every weight is checked. Both must freeze exactly
    what a full check every step freezes."""

    class FullCheckTracker(OscillationTracker):
        def step(self, freeze_threshold=0.0):
            self._cleared = float("inf")
            super().step(freeze_threshold)

    def run(cls):
        torch.manual_seed(2)
        layer = QuantLinear(40, 30, bias=False, weight_bits=4)
        tracker = cls(layer, momentum=0.1)
        ints = torch.zeros(layer.weight.shape)
        frozen_per_step = []
        for step in range(60):
            ints = (ints + torch.randint(-1, 2, ints.shape) * (torch.rand(ints.shape) < 0.4)).clamp(-8, 7)
            layer.last_weight_int = ints.clone()
            # off, then falling slowly (flipped weights only), sharply (a full check), then flat
            threshold = 0.0 if step < 10 else 0.4 - 0.001 * step if step < 30 else 0.25 if step < 40 else 0.18
            tracker.step(freeze_threshold=threshold)
            frozen_per_step.append(layer.frozen_mask.clone())
        return frozen_per_step, layer.frozen_int.clone()

    fast, fast_int = run(OscillationTracker)
    full, full_int = run(FullCheckTracker)
    counts = [int(f.sum()) for f in fast]
    assert counts[20] > 0 and counts[35] > counts[29] and counts[-1] > counts[39], counts
    for a, b in zip(fast, full):
        assert torch.equal(a, b)
    assert torch.equal(fast_int, full_int)


def test_hand_frozen_weights_are_not_frozen_again():
    layer = QuantLinear(2, 2, bias=False, weight_bits=4)
    tracker = OscillationTracker(layer, momentum=0.5)
    _feed(tracker, layer, [[[0, 1], [0, 1]], [[1, 0], [1, 0]], [[0, 1], [0, 1]]])
    assert (tracker.states[""].freq > 0.2).all()
    with torch.no_grad():  # freeze one weight by hand, pinned to 5
        layer.frozen_mask[0, 0] = True
        layer.frozen_int[0, 0] = 5
    layer.refresh_frozen()
    _feed(tracker, layer, [[[1, 0], [1, 0]]], freeze_threshold=0.2)
    assert layer.frozen_mask.all()
    assert layer.frozen_int[0, 0].item() == 5  # the hand-set integer stays
    idx, vals = layer.frozen_sparse()
    assert sorted(idx.tolist()) == [0, 1, 2, 3]  # each weight once
    assert vals[idx.tolist().index(0)].item() == 5.0
    assert float(tracker.states[""].freq.max()) == 0.0


def test_tracker_leaves_layers_without_a_forward_untouched():
    model = nn.Sequential(QuantLinear(2, 2, bias=False, weight_bits=4), QuantLinear(2, 2, bias=False, weight_bits=4))
    tracker = OscillationTracker(model, momentum=0.5)
    a, b = model[0], model[1]
    for ints in ([0, 1], [1, 0], [0, 1]):
        a.last_weight_int = torch.tensor([ints, ints], dtype=torch.float32)
        b.last_weight_int = torch.tensor([ints, ints], dtype=torch.float32)
        tracker.step()
    before = {k: getattr(tracker.states["1"], k).clone() for k in ("freq", "last_dir", "int_ema", "prev_int")}
    a.last_weight_int = torch.tensor([[1, 0], [1, 0]], dtype=torch.float32)  # only layer 0 ran
    tracker.step()
    for key, value in before.items():
        assert torch.equal(getattr(tracker.states["1"], key), value), key
    assert tracker.states["0"].freq[0, 0].item() == 0.75  # 0.5 * 0.5 + 0.5 * 1


def test_tracker_only_counts_layers_up_to_max_bits():
    model = quantize_model(create_model("demo_net", num_classes=3, in_chans=1), QuantConfig(weight_bits=4, act_bits=4))
    tracker = OscillationTracker(model, momentum=0.1, max_bits=4)
    assert "stem.0" not in tracker.layers and "classifier" not in tracker.layers  # 8-bit layers
    assert set(tracker.layers) == {n for n, ql in quant_layers(model) if ql.weight_bits == 4}
    with pytest.raises(ValueError):
        OscillationTracker(model, momentum=0.0)


def test_tracker_ignores_steps_without_a_new_forward():
    layer = QuantLinear(3, 2, weight_bits=3)
    tracker = OscillationTracker(layer, momentum=0.5)
    state = tracker.states[""]
    _feed(tracker, layer, [[[0, 1, 0], [0, 0, 0]], [[0, 2, 0], [0, 0, 0]], [[0, 1, 0], [0, 0, 0]]])
    freq = state.freq.clone()
    assert freq[0, 1] == 0.5
    tracker.step()  # no forward since the last step: nothing to compare against
    tracker.step()
    torch.testing.assert_close(state.freq, freq)


def test_summary_keys_and_fractions():
    model = quantize_model(create_model("demo_net", num_classes=3, in_chans=1), QuantConfig(weight_bits=4, act_bits=4))
    model(torch.randn(2, 1, 8, 8))
    tracker = OscillationTracker(model, momentum=0.1, max_bits=4, report_threshold=0.01)
    summary = tracker.summary()
    for key in ("osc_frac", "osc_frac_depthwise", "osc_frac_pointwise", "frozen_frac", "layers"):
        assert key in summary
    assert summary["osc_frac"] == 0.0 and summary["frozen_frac"] == 0.0
    assert set(summary["layers"]) == set(tracker.layers)
    kinds = {n: v["kind"] for n, v in summary["layers"].items()}
    assert kinds["blocks.0.0"] == "depthwise" and kinds["blocks.0.3"] == "pointwise"
    for entry in summary["layers"].values():
        assert {"osc_frac", "frozen_frac", "kind", "numel", "bits"} <= set(entry)

    # mark every depthwise weight oscillating and freeze half of one pointwise layer
    dw = [n for n, k in kinds.items() if k == "depthwise"]
    pw = [n for n, k in kinds.items() if k == "pointwise"]
    for n in dw:
        tracker.states[n].freq.fill_(0.5)
    layer = tracker.layers[pw[0]]
    flat = layer.frozen_mask.view(-1)
    flat[: flat.numel() // 2] = True
    layer.refresh_frozen()
    total = sum(ql.weight.numel() for ql in tracker.layers.values())
    dw_total = sum(tracker.layers[n].weight.numel() for n in dw)
    pw_total = sum(tracker.layers[n].weight.numel() for n in pw)
    s = tracker.summary()
    assert s["osc_frac_depthwise"] == 1.0
    assert s["osc_frac_pointwise"] == 0.0
    assert s["osc_frac"] == pytest.approx(dw_total / total)
    assert s["frozen_frac"] == pytest.approx((flat.numel() // 2) / total)
    assert s["frozen_frac_pointwise"] == pytest.approx((flat.numel() // 2) / pw_total)
    assert s["layers"][dw[0]]["osc_frac"] == 1.0
    assert s["layers"][pw[0]]["frozen_frac"] == pytest.approx(0.5, abs=1e-2)


def test_tracker_state_dict_round_trip():
    layer = QuantLinear(3, 2, weight_bits=3)
    tracker = OscillationTracker(layer, momentum=0.5)
    _feed(tracker, layer, [[[0, 1, 0], [0, 0, 0]], [[0, 2, 0], [0, 0, 0]], [[0, 1, 0], [1, 0, 0]]])
    other = OscillationTracker(layer, momentum=0.5)
    other.load_state_dict(tracker.state_dict())
    assert other.steps == 3
    for key in ("prev_int", "last_dir", "freq", "int_ema"):
        assert torch.equal(getattr(other.states[""], key), getattr(tracker.states[""], key)), key


# ----------------------------------------------------------------------------- freezing in training
def test_frozen_weights_never_change_under_sgd_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear(16, 32, weight_bits=2, act_bits=4), nn.ReLU(),
        QuantLinear(32, 4, weight_bits=2, act_bits=4),
    )
    x = torch.randn(256, 16)
    y = (x[:, :4] * 3).argmax(1)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 0.05}, {"params": others}], lr=0.2, momentum=0.9)
    tracker = OscillationTracker(model, momentum=0.2, max_bits=4)
    layers = list(tracker.layers.values())
    assert len(layers) == 2

    def train_step(i):
        idx = torch.arange(i * 32, i * 32 + 32) % 256
        loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.01 * dampening_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step(freeze_threshold=0.15)

    for i in range(40):
        train_step(i)
    masks = [ql.frozen_mask.clone() for ql in layers]
    assert sum(int(m.sum()) for m in masks) > 0, "nothing froze; the test would prove nothing"
    frozen_int = [ql.frozen_int.clone() for ql in layers]
    ints = [ql.weight_int().clone() for ql in layers]
    latents = [ql.weight.detach().clone() for ql in layers]
    for ql, m, fi in zip(layers, masks, frozen_int):
        assert torch.equal(ints[layers.index(ql)][m], fi[m].float())

    for i in range(40, 140):
        train_step(i)
    changed = 0
    for ql, m, fi, w_int, w in zip(layers, masks, frozen_int, ints, latents):
        assert torch.all(ql.frozen_mask[m]), "a frozen weight was unfrozen"
        assert torch.equal(ql.frozen_int[m], fi[m])
        now_int = ql.weight_int()
        assert torch.equal(now_int[m], w_int[m]), "a frozen weight changed its integer value"
        assert torch.equal(ql.weight.detach()[m], w[m]), "a frozen weight's latent value drifted"
        unfrozen = ~ql.frozen_mask
        changed += int((ql.weight.detach()[unfrozen] != w[unfrozen]).sum())
    assert changed > 0, "training did not move the unfrozen weights"



def test_tracked_weights_share_one_aligned_flat_tensor_and_relink_when_replaced():
    """The tracker moves the tracked weights into one flat tensor (one scatter pins every frozen
    weight): same Parameter objects, same values, each slice 64-byte aligned; a weight replaced
    later (as model.to does) is linked again at the next step, keeping its new values and pins."""
    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d(3, 5, 3, weight_bits=4), nn.Flatten(), QuantLinear(5 * 4 * 4, 7, weight_bits=4))
    params = [model[0].weight, model[2].weight]
    before = [p.detach().clone() for p in params]
    x = torch.randn(2, 3, 6, 6)
    model(x)
    tracker = OscillationTracker(model, momentum=0.1)
    flat = tracker._flat_w
    for p, b in zip(params, before):
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert (p.data_ptr() - flat.data_ptr()) % 64 == 0 and p.is_contiguous()
        assert torch.equal(p.detach(), b)
    assert model[0].weight is params[0] and model[2].weight is params[1]
    tracker.step()
    model[2].freeze_weights(torch.tensor([3, 11]), torch.tensor([1.0, -1.0]))
    model(x)
    tracker.step()  # takes the hand-frozen weights in: pinned at their values now
    pinned = params[1].detach().view(-1)[[3, 11]].clone()
    with torch.no_grad():
        params[1].data = params[1].detach().clone() + 1.0  # a replaced weight, moved by an update
    model(x)
    tracker.step()
    assert params[1].untyped_storage().data_ptr() == tracker._flat_w.untyped_storage().data_ptr()
    assert params[0].untyped_storage().data_ptr() == tracker._flat_w.untyped_storage().data_ptr()
    w = params[1].detach().view(-1)
    assert torch.equal(w[[3, 11]], pinned)  # pinned again after the relink
    assert torch.equal(w[[0, 1, 2]], before[1].view(-1)[[0, 1, 2]] + 1.0)  # the others keep the new values
    assert torch.equal(params[0].detach(), before[0])


def test_weights_frozen_by_hand_are_pinned_from_the_next_step_and_across_a_resume():
    torch.manual_seed(0)
    layer = QuantLinear(4, 3, weight_bits=4)
    x = torch.randn(2, 4)
    layer(x)
    tracker = OscillationTracker(layer, momentum=0.1)
    tracker.step()
    layer.freeze_weights(torch.tensor([0, 5]), torch.tensor([1.0, -2.0]))
    with torch.no_grad():
        layer.weight.add_(0.5)  # the optimizer step after the freeze
    at_step = layer.weight.detach().clone()
    layer(x)
    tracker.step()  # pinned at these values from here on
    assert torch.equal(tracker.states[""].frozen_latent, at_step)
    with torch.no_grad():
        layer.weight.add_(0.25)
    layer(x)
    tracker.step()
    w = layer.weight.detach().view(-1)
    assert torch.equal(w[[0, 5]], at_step.view(-1)[[0, 5]])
    assert torch.equal(w[[1, 2, 3]], at_step.view(-1)[[1, 2, 3]] + 0.25)
    # a fresh layer and tracker loaded from both states pin the same values
    other = QuantLinear(4, 3, weight_bits=4)
    other.load_state_dict(layer.state_dict())
    resumed = OscillationTracker(other, momentum=0.1)
    resumed.load_state_dict(tracker.state_dict())
    with torch.no_grad():
        other.weight.add_(1.0)
    other(x)
    resumed.step()
    v = other.weight.detach().view(-1)
    assert torch.equal(v[[0, 5]], at_step.view(-1)[[0, 5]])
    assert torch.equal(v[[1, 2, 3]], w[[1, 2, 3]] + 1.0)
    frozen = layer.frozen_mask
    assert torch.equal(other.weight_int()[frozen], layer.weight_int()[frozen])  # -> [1, -2]
    assert other.weight_int().view(-1)[[0, 5]].tolist() == [1.0, -2.0]


# ----------------------------------------------------------------------------- dampening
def _hand_layer():
    """3-bit (n=-4, p=3), scale 0.5. Squared distances to the bin centre, clipped weights give 0:
    row 0: 0.1 -> c 0 (0.01); 0.6 -> c 0.5 (0.01); 2.0 -> clipped to 1.5 = c (0)
    row 1: -0.3 -> c -0.5 (0.04); -2.5 -> clipped to -2.0 = c (0); 0.74 -> c 0.5 (0.0576)
    """
    layer = QuantLinear(3, 2, bias=False, weight_bits=3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.6, 2.0], [-0.3, -2.5, 0.74]]))
    _set_scale(layer, 0.5)
    return layer


@pytest.mark.parametrize("aggregation,expected", [
    ("sum", 0.1176),
    ("mean", 0.1176 / 6),
    ("kernel_mean", (0.02 / 3) + (0.0976 / 3)),  # sum over output channels of the per-row mean
])
def test_dampening_loss_hand_computed(aggregation, expected):
    layer = _hand_layer()
    layer(torch.randn(1, 3))
    loss = dampening_loss(layer, aggregation)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dampening_kernel_mean_weights_depthwise_elements():
    """Depthwise 3x3: each element weighs 1/9; sum over the output channels."""
    conv = QuantConv2d(2, 2, 3, groups=2, bias=False, weight_bits=4)
    _set_scale(conv, 0.25)
    w = torch.zeros(2, 1, 3, 3)
    w[0, 0, 0, 0] = 0.1   # -> c 0.0, d^2 = 0.01
    w[1, 0, 2, 2] = 0.2   # -> c 0.25, d^2 = 0.0025
    w[1, 0, 1, 1] = -0.4  # -> c -0.5, d^2 = 0.01
    with torch.no_grad():
        conv.weight.copy_(w)
    conv.weight_int()
    assert layer_dampening_loss(conv, "kernel_mean").item() == pytest.approx((0.01 + 0.0125) / 9, abs=1e-7)
    assert layer_dampening_loss(conv, "sum").item() == pytest.approx(0.0225, abs=1e-7)
    assert layer_dampening_loss(conv, "mean").item() == pytest.approx(0.0225 / 18, abs=1e-7)


def test_dampening_gradient_only_to_latent_weights_zero_when_clipped():
    layer = _hand_layer()
    layer(torch.randn(1, 3))
    dampening_loss(layer, "sum").backward()
    expected = torch.tensor([[2 * 0.1, 2 * 0.1, 0.0], [2 * 0.2, 0.0, 2 * 0.24]])
    torch.testing.assert_close(layer.weight.grad, expected, rtol=0, atol=1e-6)
    assert layer.weight_quantizer.scale.grad is None or layer.weight_quantizer.scale.grad.abs().item() == 0.0
    assert layer.input_quantizer is None


def test_dampening_ignores_frozen_weights_and_high_bit_layers():
    layer = _hand_layer()
    with torch.no_grad():
        layer.frozen_mask[1, 2] = True
        layer.frozen_int[1, 2] = 1
    layer.refresh_frozen()
    layer.weight_int()
    assert dampening_loss(layer, "sum").item() == pytest.approx(0.1176 - 0.0576, abs=1e-6)
    model = nn.Sequential(_hand_layer(), nn.Identity())
    model[0].weight_int()
    assert dampening_loss(model, "sum", max_bits=2).item() == 0.0  # 3-bit layer excluded
    assert dampening_loss(model, "sum", max_bits=3).item() == pytest.approx(0.1176, abs=1e-6)
    with pytest.raises(ValueError):
        dampening_loss(model, "median")


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("aggregation", ["kernel_mean", "sum", "mean"])
def test_fused_dampening_matches_the_unfused_formula(per_channel, aggregation):
    """The quantizer's fused dampening sum and gradient equal the explicit autograd formula,
    frozen weights and clipped weights included, with the task gradient flowing alongside."""
    from oscqat.dampening import enable_fused_dampening

    def build():
        torch.manual_seed(3)
        model = nn.Sequential(QuantConv2d(3, 6, 3, bias=False, weight_bits=3, act_bits=4, per_channel=per_channel),
                              nn.Flatten(), QuantLinear(6 * 4 * 4, 5, weight_bits=4, per_channel=per_channel))
        x = torch.randn(4, 3, 6, 6)
        model(x)  # calibrate
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight_quantizer.scale.mul_(0.7)  # force some clipping
            model[0].frozen_mask.view(-1)[::7] = True
            model[0].frozen_int.view(-1)[::7] = 1
        model[0].refresh_frozen()
        return model, x

    fused, x = build()
    assert enable_fused_dampening(fused, max_bits=8) == 2
    out = fused(x)
    assert all(layer.last_damp is not None for layer in (fused[0], fused[2]))
    loss_f = dampening_loss(fused, aggregation)
    (out.square().mean() + 0.3 * loss_f).backward()

    plain, x = build()
    out = plain(x)
    assert plain[0].last_damp is None
    loss_p = dampening_loss(plain, aggregation)
    (out.square().mean() + 0.3 * loss_p).backward()

    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-7)
    assert loss_p.item() > 0
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    frozen = fused[0].frozen_mask
    assert torch.all(fused[0].weight.grad[frozen] == 0)

    fused.eval()  # evaluation (and no_grad) forwards do not compute it
    fused(x)
    assert fused[0].last_damp is None


# ----------------------------------------------------------------------------- schedules
def test_dampen_lambda_cosine_ramp():
    assert dampen_lambda_at(0.0, 0.1) == 0.0
    assert dampen_lambda_at(0.2499, 0.1) == 0.0
    assert dampen_lambda_at(0.25, 0.1) == pytest.approx(0.0)
    assert dampen_lambda_at(0.625, 0.1) == pytest.approx(0.05)  # half way through the ramp
    assert dampen_lambda_at(1.0, 0.1) == pytest.approx(0.1)
    r = 0.3
    assert dampen_lambda_at(0.25 + 0.75 * r, 0.1) == pytest.approx(0.1 * (1 - math.cos(math.pi * r)) / 2)
    assert dampen_lambda_at(0.5, 2.0, start=0.0) == pytest.approx(1.0)
    values = [dampen_lambda_at(p / 100, 0.1) for p in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_freeze_threshold_cosine_ramp():
    assert freeze_threshold_at(0.1, 0.1, 0.01) == 0.0  # no freezing before the start
    assert freeze_threshold_at(0.25, 0.1, 0.01) == pytest.approx(0.1)
    assert freeze_threshold_at(0.625, 0.1, 0.01) == pytest.approx(0.055)
    assert freeze_threshold_at(1.0, 0.1, 0.01) == pytest.approx(0.01)
    assert freeze_threshold_at(0.5, 0.2, 0.02, start=0.5) == pytest.approx(0.2)
    values = [freeze_threshold_at(p / 100, 0.1, 0.01) for p in range(25, 101)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_cosine_lr_factor():
    assert cosine_lr_factor(0, 10) == 1.0
    assert cosine_lr_factor(5, 10) == pytest.approx(0.5)
    assert cosine_lr_factor(10, 10) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- BN re-estimation
def _bn_model():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.1), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    return model


def test_reestimate_bn_population_statistics():
    torch.manual_seed(0)
    model = _bn_model()
    bn = model[1]
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, 4, 4, generator=gen) * (1 + i) + i, torch.zeros(8)) for i in range(6)]
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches[:4]]
    model.train()
    used = reestimate_bn(model, batches, num_batches=4)
    assert used == 4
    # cumulative average of the per-batch statistics (= the mean of the 4 batches, equal sizes)
    per_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    per_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(bn.running_mean, per_mean.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, torch.cat(feats).mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, per_var.mean(0), rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4
    # momentum and modes are restored
    assert bn.momentum == 0.1
    assert model.training and bn.training and model[3].training


def test_reestimate_bn_iid_batches_match_pooled_variance():
    model = _bn_model()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(64, 2, 4, 4, generator=gen) * 2 + 1 for _ in range(20)]
    with torch.no_grad():
        pooled = model[0](torch.cat(batches))
    model.eval()
    reestimate_bn(model, batches, num_batches=50)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, pooled.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, pooled.var(dim=(0, 2, 3)), rtol=2e-2, atol=1e-3)
    assert not model.training and not bn.training and bn.momentum == 0.1


def test_reestimate_bn_keeps_dropout_off_and_restores_mixed_modes():
    model = _bn_model()
    model.train()
    model[3].eval()  # e.g. a deliberately frozen submodule
    seen_dropout_modes = []
    model[3].register_forward_hook(lambda m, i, o: seen_dropout_modes.append(m.training))
    reestimate_bn(model, [torch.randn(4, 2, 4, 4) for _ in range(3)], num_batches=3)
    assert seen_dropout_modes == [False, False, False]  # only BN runs in train mode
    assert model.training and model[1].training
    assert not model[3].training, "a submodule's own mode was not restored"


def test_reestimate_bn_changes_eval_output():
    """After re-estimation the eval-mode BN normalises the re-estimation data to ~zero mean."""
    model = _bn_model()
    x = torch.randn(32, 2, 4, 4) * 3 + 5
    reestimate_bn(model, [x], num_batches=1)
    model.eval()
    with torch.no_grad():
        out = model[1](model[0](x))
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (out.var(dim=(0, 2, 3)) - 1).abs().max() < 0.05


# ----------------------------------------------------------------------------- scale-driven flips
def test_flip_attribution_separates_scale_moves_from_weight_moves():
    """Integer changes caused only by the scale count as scale-driven, those caused only by the
    weights as weight-driven; steps without a recorded forward (hand-fed integers) count nothing."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, bias=False, weight_bits=4)
    tracker = OscillationTracker(layer, momentum=0.1, max_bits=4)
    x = torch.randn(8, 64)

    def train_forward():
        layer(x).sum().backward()
        layer.zero_grad()
        tracker.step()

    train_forward()
    train_forward()
    assert tracker.pop_flip_stats() == (0, 0)  # nothing moved
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(1.03)
    train_forward()
    scale_driven, total = tracker.pop_flip_stats()
    assert total > 50 and scale_driven == total
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.3 * float(layer.weight_quantizer.scale))
    train_forward()
    scale_driven, total = tracker.pop_flip_stats()
    assert total > 50 and scale_driven == 0
    # both at once: a share strictly between 0 and 1
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(1.05)
        layer.weight.add_(torch.randn_like(layer.weight) * 0.1 * float(layer.weight_quantizer.scale))
    train_forward()
    scale_driven, total = tracker.pop_flip_stats()
    assert 0 < scale_driven < total
    _feed(tracker, layer, [torch.zeros(32 * 64).tolist(), torch.ones(32 * 64).tolist()])
    assert tracker.pop_flip_stats() == (0, 0)


def test_flip_attribution_per_channel_scales():
    torch.manual_seed(1)
    layer = QuantConv2d(4, 6, 3, bias=False, weight_bits=3, per_channel=True)
    tracker = OscillationTracker(layer, momentum=0.1, max_bits=4)
    x = torch.randn(2, 4, 8, 8)
    for _ in range(2):
        layer(x).sum().backward()
        tracker.step()
    tracker.pop_flip_stats()
    with torch.no_grad():
        layer.weight_quantizer.scale[2] *= 1.2  # only channel 2's scale moves
    layer(x).sum().backward()
    tracker.step()
    scale_driven, total = tracker.pop_flip_stats()
    assert total > 0 and scale_driven == total


# ----------------------------------------------------------------------------- compiled step's split
@pytest.mark.parametrize("per_channel", [False, True])
def test_observe_before_the_optimizer_step_equals_step_alone(per_channel):
    """A compiled step's forward keeps no ``x / s`` (``record_forward`` is off inside a graph), so
    it calls ``observe()`` before the optimizer step and ``step()`` after it. That leaves the same
    tracker and frozen state as ``step()`` alone on a recorded forward, step for step, with
    freezing on and moves both dense (large steps early) and sparse; the scale-flip counts, read
    from the live weights instead of the recorded ``x / s``, agree exactly."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    quantize_model(model, QuantConfig(weight_bits=3, act_bits=4, per_channel=per_channel))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    runs = []
    for net in (model, twin):
        tracker = OscillationTracker(net, momentum=0.1, max_bits=4)
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        runs.append((net, tracker, opt))
    for layer in runs[1][1].layers.values():  # as inside a compiled graph: no recorded x / s
        layer.weight_quantizer.record_forward = False
    scale_driven = 0
    for step in range(40):
        lr = 0.5 if step < 10 else 0.02
        for i, (net, tracker, opt) in enumerate(runs):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if i == 1:
                assert all(layer.weight_quantizer.last_v is None for layer in tracker.layers.values())
                tracker.observe()
            opt.step()
            tracker.step(freeze_threshold=0.15 if step >= 5 else 0.0)
        (a_net, a, _), (b_net, b, _) = runs
        assert torch.equal(a._prev, b._prev), step
        for key in ("freq", "last_dir", "int_ema"):
            for name in a.states:
                assert torch.allclose(getattr(a.states[name], key), getattr(b.states[name], key), atol=1e-6), (step, key)
        for (_, la), (_, lb) in zip(quant_layers(a_net), quant_layers(b_net)):
            assert torch.equal(la.frozen_mask, lb.frozen_mask), step
            assert torch.equal(la.weight, lb.weight), step
        flips = a.pop_flip_stats()
        assert flips == b.pop_flip_stats(), step
        scale_driven += flips[0]
    assert scale_driven > 0  # the attribution was exercised
    assert runs[1][1].summary()["frozen_frac"] > 0.01


def test_flip_attribution_across_layers_of_different_bits_and_after_a_resume():
    """Attribution is batched over layers: each index must get its own layer's scale entry and
    grid bounds (a 3-bit layer before a 4-bit one: the 4-bit integers beyond 3 would clamp
    wrongly), and a tracker restored from ``state_dict`` attributes its first update too."""
    torch.manual_seed(2)
    model = nn.Sequential(QuantLinear(16, 8, bias=False, weight_bits=3, per_channel=True),
                          QuantLinear(8, 8, bias=False, weight_bits=4))
    tracker = OscillationTracker(model, momentum=0.1, max_bits=4)
    x = torch.randn(4, 16)

    def forward():
        model(x).sum().backward()
        model.zero_grad()

    for _ in range(2):
        forward()
        tracker.step()
    assert model[1].weight_int().abs().max() > 3  # the 4-bit layer uses its wider grid
    with torch.no_grad():
        for layer in model:
            layer.weight_quantizer.scale.mul_(1.15)
    forward()
    tracker.step()
    scale_driven, total = tracker.pop_flip_stats()
    assert total > 20 and scale_driven == total
    resumed = OscillationTracker(model, momentum=0.1, max_bits=4)
    resumed.load_state_dict(tracker.state_dict())
    with torch.no_grad():
        model[1].weight_quantizer.scale.mul_(0.85)
    forward()
    resumed.step()
    scale_driven, total = resumed.pop_flip_stats()
    assert total > 5 and scale_driven == total


def test_freezing_reaches_frozen_buffers_replaced_after_the_tracker_was_built():
    """The tracker marks frozen weights in flat tensors that the layers' ``frozen_mask`` and
    ``frozen_int`` view; a layer whose buffers were replaced later (``model.to``, an assignment)
    must still get its new frozen weights, and keep what its new buffers held."""
    model = nn.Sequential(QuantLinear(2, 2, bias=False, weight_bits=4), QuantLinear(2, 2, bias=False, weight_bits=4))
    tracker = OscillationTracker(model, momentum=0.5)
    a, b = model

    def feed(ints, threshold=0.0):
        for layer in model:
            layer.last_weight_int = torch.tensor(ints, dtype=torch.float32)
        tracker.step(freeze_threshold=threshold)

    feed([[0, 1], [0, 1]])
    feed([[1, 0], [1, 0]])
    feed([[0, 1], [0, 1]])
    mask, ints = torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.int8)
    mask[1, 1], ints[1, 1] = True, 5
    b.frozen_mask, b.frozen_int = mask, ints  # new tensors, not the tracker's views
    b.refresh_frozen()
    feed([[1, 0], [1, 0]], threshold=0.2)
    for layer in model:
        assert layer.frozen_mask.all()
        assert sorted(layer.frozen_sparse()[0].tolist()) == [0, 1, 2, 3]
    assert b.frozen_int[1, 1].item() == 5  # the hand-set integer stays
    assert b.weight_int()[1, 1].item() == 5 and a.weight_int()[0, 0].item() == b.weight_int()[0, 0].item()


@pytest.mark.parametrize("compiled_steps", [False, True], ids=["eager", "observe-then-step"])
def test_sparse_frozen_index_follows_freezing_step_by_step(compiled_steps):
    """Eager steps grow each touched layer's sparse index by the newly frozen weights (its next
    forward reads it); steps after ``observe`` (a compiled forward reads the dense buffers) only
    mark it stale. Either way the index a forward gets equals the dense mask and integers."""
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(16, 32, bias=False, weight_bits=3), QuantLinear(32, 8, bias=False, weight_bits=3))
    x = torch.randn(4, 16)
    model(x)  # calibrate
    layers = [model[0], model[1]]
    with torch.no_grad():  # every weight at a bin boundary: noise flips them back and forth
        for layer in layers:
            s = layer.weight_quantizer.scale
            layer.weight.copy_((torch.randint(-3, 3, layer.weight.shape) + 0.5) * s)
    base = [layer.weight.detach().clone() for layer in layers]
    tracker = OscillationTracker(model, momentum=0.3)
    grew = partial = 0
    for step in range(40):
        with torch.no_grad():
            for layer, b in zip(layers, base):
                s = layer.weight_quantizer.scale
                layer.weight.copy_(torch.where(layer.frozen_mask, layer.weight, b + 0.01 * s * torch.randn_like(b)))
        model(x)
        if compiled_steps:
            tracker.observe()
        before = [int(layer.frozen_mask.sum()) for layer in layers]
        tracker.step(freeze_threshold=0.45)
        for layer, n in zip(layers, before):
            frozen = int(layer.frozen_mask.sum())
            grew += frozen > n
            if frozen > n:  # eager: appended in place; after observe: stale until a forward reads it
                assert layer._sparse_stale == compiled_steps
            idx, vals = layer.frozen_sparse()
            if frozen == 0:
                assert idx is None
                continue
            expect = layer.frozen_mask.view(-1).nonzero().squeeze(1)
            assert sorted(idx.tolist()) == expect.tolist()
            got = dict(zip(idx.tolist(), vals.tolist()))
            assert [got[i] for i in expect.tolist()] == layer.frozen_int.view(-1)[expect].float().tolist()
            w_int = layer.weight_int().view(-1)
            assert torch.equal(w_int[expect], layer.frozen_int.view(-1)[expect].float())
            partial += 0 < frozen < layer.weight.numel()
    assert grew >= 4 and partial >= 4  # the frozen sets grew over several steps, part-frozen between


def test_tracked_weights_of_mixed_dtypes_are_refused_with_a_clear_error():
    """The tracker moves all tracked weights into one flat tensor: it names the mix it cannot hold."""
    model = nn.Sequential(QuantLinear(2, 2, bias=False, weight_bits=4), QuantLinear(2, 2, bias=False, weight_bits=4))
    model[1].double()
    with pytest.raises(ValueError, match=r"one dtype and device.*float64"):
        OscillationTracker(model)
