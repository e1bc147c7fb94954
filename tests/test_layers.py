"""Quantized layers and ``quantize_model`` on every registry model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oscqat import QuantConfig, QuantConv2d, QuantLinear, create_model, layer_bits, list_models, quant_layers, quantize_model
from oscqat.layers import QuantMixin

EXPECTED_MODELS = {"demo_net", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_lite0",
                   "resnet18", "mini_mobilenet_v2"}
# (first conv, classifier) of each registry model, in module order.
FIRST_LAST = {
    "demo_net": ("stem.0", "classifier"),
    "mobilenet_v2": ("features.0.0", "classifier.1"),
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
    "mobilenet_v3_large": ("features.0.0", "classifier.3"),
    "efficientnet_lite0": ("conv_stem", "classifier"),
    "resnet18": ("conv1", "fc"),
    "mini_mobilenet_v2": ("stem.0", "classifier"),
}


def test_registry_lists_the_paper_models():
    assert set(list_models()) == EXPECTED_MODELS
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg16", num_classes=3)


@pytest.mark.parametrize("arch", sorted(EXPECTED_MODELS))
def test_quantize_model_default_policy(arch):
    model = create_model(arch, num_classes=7)
    float_layers = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    depthwise_names = [n for n, m in model.named_modules()
                       if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    params_before = {n: p for n, p in model.named_parameters()}

    out = quantize_model(model, QuantConfig(weight_bits=3, act_bits=3))
    assert out is model
    layers = dict(quant_layers(model))
    # every conv/linear (depthwise and SE convs included) was swapped, nothing else
    assert list(layers) == float_layers
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]

    first, last = FIRST_LAST[arch]
    assert list(layers)[0] == first and list(layers)[-1] == last
    f = layers[first]
    assert isinstance(f, QuantConv2d)
    assert f.weight_bits == 8 and f.weight_quantizer.bits == 8
    assert f.act_bits is None and f.input_quantizer is None  # image input stays float
    c = layers[last]
    assert isinstance(c, QuantLinear) and c.out_features == 7
    assert c.weight_bits == 8 and c.act_bits == 8
    assert c.input_quantizer is not None and c.input_quantizer.bits == 8
    for name, layer in layers.items():
        if name in (first, last):
            continue
        assert layer.weight_bits == 3 and layer.weight_quantizer.bits == 3, name
        assert layer.act_bits == 3 and layer.input_quantizer.bits == 3, name
        assert layer.weight_quantizer.signed, name
    if arch != "resnet18":
        assert depthwise_names, "expected depthwise convs"
        for name in depthwise_names:
            assert layers[name].is_depthwise and layers[name].weight_bits == 3
    # the quantized layers share (not copy) the float parameters
    for n, p in model.named_parameters():
        if n in params_before:
            assert p is params_before[n], n
    assert layer_bits(model)[first] == (8, None)


@pytest.mark.parametrize("arch", ["demo_net", "mobilenet_v2"])
def test_quantized_model_forward_32x32(arch):
    torch.manual_seed(0)
    in_chans = 1 if arch == "demo_net" else 3
    # min-max init keeps this fast (MSE init searches 100 scales per quantizer)
    model = quantize_model(create_model(arch, num_classes=4, in_chans=in_chans),
                           QuantConfig(weight_bits=4, act_bits=4, scale_init="minmax"))
    x = torch.randn(2, in_chans, 32, 32)
    y = model(x)
    assert y.shape == (2, 4) and torch.isfinite(y).all()
    for name, layer in quant_layers(model):
        assert bool(layer.weight_quantizer.initialized), name
        if layer.input_quantizer is not None:
            assert bool(layer.input_quantizer.initialized), name
    # inputs after ReLU/ReLU6 are detected as unsigned; MobileNetV2's linear bottlenecks feed signed inputs
    signs = {n: ql.input_quantizer.signed for n, ql in quant_layers(model) if ql.input_quantizer is not None}
    if arch == "demo_net":  # every quantized input follows a ReLU6
        assert not any(signs.values())
    else:
        assert any(signs.values()) and not all(signs.values())
        assert not signs["features.1.conv.1"]  # projection conv: input after ReLU6 -> unsigned
        assert signs["features.2.conv.0.0"]  # expansion conv: input is the previous linear bottleneck
    y.sum().backward()
    assert all(ql.weight.grad is not None for _, ql in quant_layers(model))


def test_weights_only_keeps_inputs_float():
    model = quantize_model(create_model("demo_net", num_classes=3), QuantConfig(weight_bits=4, act_bits=None))
    for name, layer in quant_layers(model):
        assert layer.input_quantizer is None, name
    assert layer_bits(model)["classifier"] == (8, None)
    assert layer_bits(model)["blocks.0.0"] == (4, None)


def test_overrides_by_fnmatch_pattern_last_match_wins():
    cfg = QuantConfig(weight_bits=4, act_bits=4, overrides=(
        ("blocks.0.*", (8, 8)),
        ("blocks.*.3", (6, 5)),      # pointwise convs; matches blocks.0.3 after the first pattern
        ("blocks.2.0", (None, None)),  # keep this depthwise conv in float
    ))
    model = quantize_model(create_model("demo_net", num_classes=3), cfg)
    bits = layer_bits(model)
    assert bits["blocks.0.0"] == (8, 8)
    assert bits["blocks.0.3"] == (6, 5)  # the later pattern wins
    assert bits["blocks.1.3"] == (6, 5)
    assert bits["blocks.1.0"] == (4, 4)
    assert "blocks.2.0" not in bits
    assert type(model.get_submodule("blocks.2.0")) is nn.Conv2d
    assert bits["stem.0"] == (8, None) and bits["classifier"] == (8, 8)
    y = model(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 3)


def test_quantize_model_rejects_bad_configs():
    with pytest.raises(ValueError):
        QuantConfig(weight_bits=1)
    with pytest.raises(ValueError):
        QuantConfig(act_bits=9)
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_quantize_model_leaves_quantized_layers_alone():
    model = quantize_model(create_model("demo_net", num_classes=3), QuantConfig(weight_bits=4))
    ids = {n: id(m) for n, m in quant_layers(model)}
    with pytest.raises(ValueError):  # nothing left to quantize
        quantize_model(model, QuantConfig(weight_bits=2))
    assert {n: id(m) for n, m in quant_layers(model)} == ids
    assert layer_bits(model)["blocks.0.0"][0] == 4


def test_quant_linear_public_constructor():
    layer = QuantLinear(6, 3, True, weight_bits=3, act_bits=4, per_channel=True)
    assert isinstance(layer, nn.Linear) and isinstance(layer, QuantMixin)
    assert layer.weight.shape == (3, 6) and layer.bias is not None
    assert layer.weight_quantizer.bits == 3 and layer.weight_quantizer.scale.shape == (3,)
    assert layer.input_quantizer.bits == 4 and layer.input_quantizer.scale.shape == ()
    assert QuantLinear(6, 3, bias=False, weight_bits=4).bias is None
    assert QuantLinear(6, 3, weight_bits=4).input_quantizer is None
    with pytest.raises(TypeError):
        QuantLinear(6, 3, True, 4)  # weight_bits is keyword-only
    y = layer(torch.randn(5, 6))
    assert y.shape == (5, 3)


def test_quant_conv_public_constructor_depthwise():
    conv = QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, weight_bits=2, act_bits=2)
    assert conv.is_depthwise and not conv.is_pointwise
    pw = QuantConv2d(8, 16, 1, weight_bits=4, per_channel=True)
    assert pw.is_pointwise and not pw.is_depthwise
    assert pw.weight_quantizer.scale.shape == (16,)
    x = torch.relu(torch.randn(2, 8, 6, 6))
    assert conv(x).shape == (2, 8, 6, 6)
    assert pw(x).shape == (2, 16, 6, 6)
    assert conv.input_quantizer.bounds == (0, 3)  # ReLU input -> unsigned


@pytest.mark.parametrize("bits,per_channel", [(2, False), (3, True), (4, False), (8, True)])
def test_weight_int_and_quantized_weight(bits, per_channel):
    torch.manual_seed(bits)
    conv = QuantConv2d(4, 6, 3, weight_bits=bits, per_channel=per_channel)
    w_int = conv.weight_int()
    n, p = conv.weight_quantizer.bounds
    assert n == -(2 ** (bits - 1)) and p == 2 ** (bits - 1) - 1
    assert torch.equal(w_int, torch.round(w_int))
    assert w_int.min() >= n and w_int.max() <= p
    assert w_int.shape == conv.weight.shape and not w_int.requires_grad
    scale = conv.weight_quantizer.scale.detach()
    if per_channel:
        scale = scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.quantized_weight(), scale * w_int, rtol=0, atol=0)
    # the forward pass uses exactly that weight
    x = torch.randn(1, 4, 5, 5)
    expected = nn.functional.conv2d(x, scale * w_int, conv.bias)
    torch.testing.assert_close(conv(x), expected)
    # and the integer weight reflects rounding of weight / scale
    torch.testing.assert_close(w_int, torch.clamp(torch.round(conv.weight.detach() / scale), n, p))


def test_frozen_weights_use_frozen_int():
    layer = QuantLinear(4, 2, weight_bits=3)
    w_int = layer.weight_int().clone()
    with torch.no_grad():
        layer.frozen_mask[0, 1] = True
        layer.frozen_int[0, 1] = 3 if w_int[0, 1] != 3 else -4
    layer.refresh_frozen()
    new_int = layer.weight_int()
    assert new_int[0, 1] == layer.frozen_int[0, 1]
    mask = torch.ones_like(w_int, dtype=torch.bool)
    mask[0, 1] = False
    assert torch.equal(new_int[mask], w_int[mask])
    torch.testing.assert_close(layer.quantized_weight(), layer.weight_quantizer.scale.detach() * new_int)
    # a frozen weight gets no gradient through the quantizer
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.weight.grad[0, 1] == 0
    assert (layer.weight.grad[mask] != 0).any()


def test_state_dict_restores_frozen_state():
    a = QuantLinear(4, 2, weight_bits=3)
    a.weight_int()
    with torch.no_grad():
        a.frozen_mask[1, 2] = True
        a.frozen_int[1, 2] = -2
    a.refresh_frozen()
    b = QuantLinear(4, 2, weight_bits=3)
    b.load_state_dict(a.state_dict())
    assert b._any_frozen
    assert torch.equal(b.weight_int(), a.weight_int())


def test_freeze_weights_marks_new_weights_and_the_sparse_index_follows():
    layer = QuantLinear(6, 3, weight_bits=3)
    layer.weight_int()
    assert layer.freeze_weights(torch.tensor([4, 1]), torch.tensor([2.0, -1.0])).tolist() == [4, 1]
    # 1 is frozen already: skipped
    assert layer.freeze_weights(torch.tensor([1, 7]), torch.tensor([0.0, 3.0])).tolist() == [7]
    idx, vals = layer.frozen_sparse()
    assert idx.tolist() == [1, 4, 7]  # rebuilt from the dense buffers, in index order
    assert vals.tolist() == [-1.0, 2.0, 3.0]
    assert layer.weight_int().view(-1)[[1, 4, 7]].tolist() == [-1.0, 2.0, 3.0]
    fresh = QuantLinear(6, 3, weight_bits=3)
    assert fresh.freeze_weights(torch.tensor([], dtype=torch.long), torch.tensor([])).numel() == 0
    assert not fresh._any_frozen and fresh.frozen_sparse()[0] is None  # nothing to freeze: still none frozen
    other = QuantLinear(6, 3, weight_bits=3)
    other.load_state_dict(layer.state_dict())
    assert other.frozen_sparse()[0].tolist() == [1, 4, 7]
    assert torch.equal(other.weight_int(), layer.weight_int())


def test_freezing_in_many_small_steps_keeps_every_entry():
    """Hundreds of small freezes, a load in between: the sparse index the eager forward reads
    holds exactly the weights frozen, with their integers."""
    torch.manual_seed(0)
    layer = QuantConv2d(8, 8, 3, weight_bits=4)
    layer.weight_int()
    order = torch.randperm(layer.weight.numel())
    expect = {}
    for step, chunk in enumerate(order[:400].split(3)):
        vals = torch.full((chunk.numel(),), float(step % 15 - 7))
        layer.freeze_weights(chunk, vals)
        expect.update(zip(chunk.tolist(), vals.tolist()))
        if step % 20 == 0:  # the forward reads the index in between
            assert layer.frozen_sparse()[0].numel() == len(expect)
        if step == 60:
            layer.load_state_dict(layer.state_dict())
    expect_idx = sorted(expect)
    expect_vals = [expect[i] for i in expect_idx]
    idx, vals = layer.frozen_sparse()
    assert idx.tolist() == expect_idx
    assert vals.tolist() == expect_vals
    assert int(layer.frozen_mask.sum()) == len(expect_idx)
    flat_int = layer.frozen_int.reshape(-1)
    assert flat_int[expect_idx].tolist() == expect_vals
