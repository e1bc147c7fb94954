"""TrainConfig.compile: the torch.compile'd training forward against the eager reference.

One Inductor compilation serves every check here (compiling the demo net's forward and backward
takes 20-70 s of CPU on a cold cache), so the checks share one module-scoped pair of runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from oscqat_helpers import tiny_train_kwargs
from oscqat import TrainConfig, Trainer, quant_layers

EPOCHS = 2


def _cfg(**overrides) -> TrainConfig:
    """dampen+freeze with both remedies on from the first step, so weights freeze every epoch."""
    kw = tiny_train_kwargs(method="dampen+freeze", epochs=EPOCHS, dampen_start=0.0, freeze_start=0.0,
                           osc_momentum=0.05, freeze_threshold_start=0.05, freeze_threshold_end=0.02,
                           dampen_lambda=0.1)
    kw.update(overrides)
    return TrainConfig(**kw)


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    eager = Trainer(_cfg())
    eager_hist = eager.fit()
    torch.manual_seed(0)
    compiled = Trainer(_cfg(compile=True))
    compiled_hist = compiled.fit()
    return eager, eager_hist, compiled, compiled_hist


def _tracked(trainer):
    return {name: layer for name, layer in quant_layers(trainer.model) if layer.weight_bits <= trainer.cfg.track_max_bits}


def test_compiled_once_while_the_frozen_set_grows(runs):
    _, _, compiled, hist = runs
    step = compiled.compiled
    assert hist[1]["frozen_frac"] > hist[0]["frozen_frac"] > 0  # freezing went on in both epochs
    # one graph for the whole run: freezing, the lambda schedule, two evaluations and a BN
    # re-estimation per epoch in between did not recompile it
    assert step.graphs_compiled == 1
    # eager calls: the first step (it calibrates the quantizers) and each epoch's smaller last batch
    assert step.eager_calls == 1 + EPOCHS
    assert step.compiled_calls == EPOCHS * compiled.steps_per_epoch - step.eager_calls
    assert hist[0]["compile_time_s"] > 0 and hist[1]["compile_time_s"] == 0.0
    assert [h["compile_graphs"] for h in hist] == [1, 0]  # the per-epoch metric MLflow shows
    assert step.compile_time_s == hist[0]["compile_time_s"]


def test_compiled_step_equals_eager_on_the_same_state(runs):
    """With frozen weights in place: the same integers (exactly), frozen values honoured, the
    losses and every gradient equal up to float reassociation."""
    _, _, trainer, _ = runs
    model, step = trainer.model, trainer.compiled
    x, y = next(iter(trainer.data.train))
    lam = torch.tensor(0.1)

    def one(fn):
        for p in model.parameters():
            p.grad = None
        loss, total, damp = fn(x, y, lam)
        total.backward()
        ints = {name: layer.last_weight_int.clone() for name, layer in quant_layers(model)}
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), float(damp.detach()), ints, grads

    before = step.graphs_compiled
    loss_c, damp_c, ints_c, grads_c = one(step._compiled)
    loss_e, damp_e, ints_e, grads_e = one(trainer._loss_terms)
    assert step.graphs_compiled == before  # a tensor lambda of another value: no recompilation
    frozen_layers = 0
    tracked = _tracked(trainer)
    assert tracked
    for name, layer in quant_layers(model):
        # a tracked layer's graph output is already in the tracker's integer type (int8 at <= 7 bits)
        assert ints_c[name].dtype == (torch.int8 if name in tracked else torch.float32), name
        assert torch.equal(ints_c[name].float(), ints_e[name]), name
        if layer._any_frozen:
            frozen_layers += 1
            mask = layer.frozen_mask
            assert torch.equal(ints_c[name][mask], layer.frozen_int[mask].float()), name
    assert frozen_layers >= 4
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert damp_c == pytest.approx(damp_e, rel=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert float((grads_c[name] - g).norm()) <= 1e-3 * float(g.norm()) + 1e-9, name


def test_compiled_forward_writes_the_trackers_integers_and_scales_in_place(runs):
    """A compiled training forward hands the tracker nothing to gather: each tracked layer's
    quantizer kernel wrote its integers (and clamped scale) into the layer's slice of the
    tracker's flat buffers, and ``last_weight_int`` is that slice. What the tracker then reads
    equals the integers and scales an eager pass computes from the same state."""
    from oscqat.quantizer import SCALE_EPS

    _, _, trainer, _ = runs
    tracker, model = trainer.tracker, trainer.model
    x, y = next(iter(trainer.data.train))
    tracker._cur.fill_(99)  # no integer of a 3-bit grid: a slice the graph did not write shows
    tracker._s_cur.fill_(-1.0)
    model.train()
    trainer.compiled(x, y, torch.tensor(0.1))
    assert trainer.compiled.last_call_compiled is False and trainer.compiled.compiled_calls > 0
    tracked = _tracked(trainer)
    for i, (name, layer) in enumerate(tracked.items()):
        st = tracker.states[name]
        assert layer.last_weight_int is layer._int_sink, name
        assert torch.equal(tracker._cur[st._slice].view(st._shape).float(), layer.weight_int()), name
        a, b = tracker._scale_starts[i], tracker._scale_starts[i + 1]
        scale = layer.weight_quantizer.scale.detach().clamp_min(SCALE_EPS).reshape(-1)
        assert torch.equal(tracker._s_cur[a:b], scale), name
    x_flat, missing = tracker._gather_ints()
    assert x_flat is tracker._cur and not missing and tracker._sinks_fed
    tracker._consume()


def test_compiled_run_follows_eager(runs):
    """Over 2 epochs (36 steps, weights freezing throughout) the runs drift apart only as float
    reassociation makes them: Inductor sums in another order (BN statistics, the scale gradient's
    reductions), the first steps agree to an ulp, and an activation that then lands within an ulp
    of a rounding boundary takes the other integer. Measured here: 1.5% of the tracked integers
    differ at the end, 96% of the frozen weights are frozen in both runs, losses agree to 5e-5."""
    eager, eager_hist, compiled, compiled_hist = runs
    for a, b in zip(eager_hist, compiled_hist):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["dampen_loss"] == pytest.approx(a["dampen_loss"], rel=1e-2)
        assert b["frozen_frac"] == pytest.approx(a["frozen_frac"], rel=0.05)
        assert abs(b["val_top1"] - a["val_top1"]) <= 0.02
        # the graph keeps no x / s, yet the scale-driven share of the integer changes is still
        # measured (OscillationTracker.observe, from the live weights and the graph's scale sinks)
        assert b["scale_flip_frac"] > 0
        assert b["scale_flip_frac"] == pytest.approx(a["scale_flip_frac"], rel=0.25)
    differ = total = frozen_e = frozen_c = frozen_both = 0
    layers_c = dict(quant_layers(compiled.model))
    for name, la in _tracked(eager).items():
        lb = layers_c[name]
        differ += int((la.weight_int() != lb.weight_int()).sum())
        total += la.weight.numel()
        frozen_e += int(la.frozen_mask.sum())
        frozen_c += int(lb.frozen_mask.sum())
        frozen_both += int((la.frozen_mask & lb.frozen_mask).sum())
    assert frozen_e > 0.05 * total
    assert differ <= 0.04 * total, (differ, total)
    assert frozen_both >= 0.9 * max(frozen_e, frozen_c), (frozen_both, frozen_e, frozen_c)


def test_each_compiled_forward_keeps_its_own_graph_and_is_freed():
    """Past dynamo's per-code-object limit (8 graphs) every new instance still compiles (a Ray
    worker runs trial after trial), and a finished one does not stay alive in dynamo's cache."""
    import gc
    import weakref

    from oscqat.compiled import CompiledForward

    class Owner:
        def __init__(self):
            self.net = torch.nn.Linear(4, 3)
            self.step = CompiledForward(self.net, self.loss, backend="eager")

        def loss(self, x, y, lam):
            out = torch.nn.functional.cross_entropy(self.net(x), y)
            return out, out * lam, None

    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    refs = []
    for _ in range(10):
        owner = Owner()
        owner.step(x, y, torch.tensor(1.0))
        owner.step(x, y, torch.tensor(2.0))
        assert owner.step.graphs_compiled == 1 and owner.step.compiled_calls == 2
        owner.step(x[:4], y[:4], torch.tensor(1.0))  # another batch shape: eager, no second graph
        assert owner.step.graphs_compiled == 1 and owner.step.eager_calls == 1
        refs.append(weakref.ref(owner))
        del owner
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_a_step_split_by_graph_breaks_is_warned_about_once():
    """A graph break (new torch, new layer type) silently splits the step into several graphs,
    with eager Python between them: the user hears of it, with the way to find where."""
    from oscqat.compiled import CompiledForward

    net = torch.nn.Linear(4, 3)

    def loss(x, y, lam):
        h = net(x)
        torch._dynamo.graph_break()
        out = torch.nn.functional.cross_entropy(h, y)
        return out, out * lam, None

    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    step = CompiledForward(net, loss, backend="eager")
    with pytest.warns(RuntimeWarning, match=r"split the training step into 2 graphs.*TORCH_LOGS=graph_breaks"):
        step(x, y, torch.tensor(1.0))
    assert step.graph_breaks == 1 and step.graphs_compiled == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(x, y, torch.tensor(2.0))  # the compiled graphs run again: no second warning, no new graph
    assert step.graphs_compiled == 2


def test_campaign_base_passes_compile_to_its_trials():
    from search.campaign import Campaign

    camp = Campaign.model_validate({"name": "c", "targets": [{"arch": "demo_net", "bits": "w4a4"}],
                                    "dataset": "digits", "base": {"compile": True}})
    assert camp.train_config(camp.targets[0], {"method": "lsq"}).compile is True
    assert camp.train_config(camp.targets[0], {}).model_dump()["compile"] is True


def test_compiled_per_tensor_scale_gradient_on_a_channels_last_input_equals_eager():
    """A graph computes a per-tensor scale's gradient as one reduction in memory order (the flat
    dot eager uses walks a channels-last tensor in logical order: a slow scalar loop in Inductor);
    the gradients must still equal eager's."""
    from oscqat.quantizer import LSQQuantizer

    torch.manual_seed(3)
    q = LSQQuantizer(4, signed=None, per_channel=False)
    x = torch.randn(4, 8, 6, 6).abs().to(memory_format=torch.channels_last)
    q(x)  # calibrates
    weight = torch.randn(4, 8, 6, 6)

    def loss(inp):
        return (q(inp) * weight).sum()

    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", dynamic=False)):
        q.zero_grad()
        inp = x.clone().requires_grad_(True)
        fn(inp).backward()
        grads.append((q.scale.grad.clone(), inp.grad.clone()))
    (s_eager, x_eager), (s_graph, x_graph) = grads
    assert float(s_eager.abs()) > 0
    torch.testing.assert_close(s_graph, s_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_graph, x_eager)
