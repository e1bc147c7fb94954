"""Deploy: the kept model, the integer QDQ ONNX export, its parity with PyTorch, size and BOPs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from oscqat_helpers import tiny_train_kwargs
from oscqat.config import TrainConfig
from oscqat.cost import model_cost, model_size_bits
from oscqat.data import TensorLoader
from oscqat.export import ExportError, check_parity, export_onnx, load_trained_model
from oscqat.export.bundle import build_quantized_model
from oscqat.export.parity import weights_bit_exact
from oscqat.layers import quant_layers
from oscqat.quantize import QuantConfig, quantize_model
from oscqat_cli import app

onnx = pytest.importorskip("onnx")
runner = CliRunner()
PARITY_KEYS = {"top1_agreement", "onnx_test_top1", "torch_test_top1", "max_abs_logit_diff", "mean_abs_logit_diff",
               "weights_bit_exact"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 2-epoch W3A3 demo training with freezing (some weights frozen), via the CLI."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("demo_run")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_train_kwargs(method="freeze", osc_momentum=0.05, freeze_threshold_start=0.02,
                                                    freeze_threshold_end=0.005, bn_reestimate_batches=2)))
    result = runner.invoke(app, ["train", str(cfg), "--out", str(tmp / "run"), "--json"])
    assert result.exit_code == 0, result.output
    return tmp / "run", json.loads(result.stdout)


def _initializers(path):
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return proto, {t.name: t for t in proto.graph.initializer}, numpy_helper


def test_train_keeps_a_model_the_loader_rebuilds(demo_run):
    run, report = demo_run
    assert report["out"] == str(run)
    trained = load_trained_model(run)
    assert trained.config.bits == "w3a3" and trained.in_chans == 1 and trained.num_classes == 10
    frozen = sum(int(m.frozen_mask.sum()) for _, m in quant_layers(trained.model))
    assert frozen > 0  # the run froze weights, and they came back
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)  # plain data only
    for name, layer in quant_layers(trained.model):
        assert torch.equal(layer.weight_quantizer.scale, state["model"][f"{name}.weight_quantizer.scale"])
        mask = layer.frozen_mask
        assert torch.equal(layer.weight_int()[mask], state["model"][f"{name}.frozen_int"][mask].float())
    # the loader also takes the resumable checkpoint, and both give the same logits
    x = torch.randn(4, 1, 8, 8)
    same = load_trained_model(run / "checkpoint.pt").model
    with torch.no_grad():
        assert torch.equal(trained.model(x), same(x))


def test_export_onnx_cli_parity_on_the_demo_net(demo_run, tmp_path):
    run, _ = demo_run
    out = tmp_path / "m" / "model.onnx"
    result = runner.invoke(app, ["export", "onnx", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.stdout and "PASS" in result.stdout
    parity = json.loads((out.parent / "parity.json").read_text())
    assert PARITY_KEYS <= set(parity)
    assert parity["weights_bit_exact"] is True and parity["top1_agreement"] >= 0.995
    assert parity["onnx_test_top1"] > 0.5 and parity["mean_abs_logit_diff"] < 1e-2
    proto, inits, numpy_helper = _initializers(out)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 9  # every quantized layer's input but the stem's (float image)
    assert "Clip" in ops and "BatchNormalization" in ops  # 3-bit grid clipped inside int8; BN kept unfolded
    trained = load_trained_model(run)
    for name, layer in quant_layers(trained.model):
        t = inits[f"{name}.weight_int"]
        want = onnx.TensorProto.INT4 if layer.weight_bits <= 4 else onnx.TensorProto.INT8
        assert t.data_type == want, name  # 3-bit body layers packed as int4, 8-bit stem/classifier as int8
        stored = numpy_helper.to_array(t).astype(np.int64)
        assert np.array_equal(stored, layer.weight_int().numpy().astype(np.int64)), name


def test_a_changed_weight_is_caught(demo_run, tmp_path):
    run, _ = demo_run
    trained = load_trained_model(run)
    good = export_onnx(trained.model, tmp_path / "good.onnx", (1, 8, 8)).path
    proto, inits, numpy_helper = _initializers(good)
    name = "blocks.1.3"
    tensor = inits[f"{name}.weight_int"]
    values = numpy_helper.to_array(tensor).astype(np.int8)
    values.reshape(-1)[0] = 3 if values.reshape(-1)[0] != 3 else -4  # one integer, still inside the 3-bit grid
    tensor.CopyFrom(onnx.helper.make_tensor(tensor.name, tensor.data_type, list(values.shape),
                                            values.reshape(-1).astype(np.int64).tolist()))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    loader = TensorLoader(torch.randn(64, 1, 8, 8), torch.zeros(64, dtype=torch.long), 32, shuffle=False)
    assert weights_bit_exact(trained.model, good) == (True, [])
    result = check_parity(trained.model, tmp_path / "bad.onnx", loader, "test")
    assert result["weights_bit_exact"] is False and result["weights_differing"] == [name]
    assert result["passed"] is False
    assert check_parity(trained.model, good, loader, "test")["passed"] is True


def test_mobilenet_v2_small_input_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(arch="mobilenet_v2", bits="w4a4", per_channel=True, device="cpu")
    model = build_quantized_model(cfg, num_classes=10, in_chans=3)
    x = torch.randn(32, 3, 16, 16)
    model.train()
    with torch.no_grad():
        model(x)  # calibrates every quantizer and sets BN statistics
    layer = model.get_submodule("features.2.conv.1.0")  # a depthwise 3x3: pin some weights to other integers
    idx = torch.arange(0, layer.weight.numel(), 7)
    layer.freeze_weights(idx, torch.full((len(idx),), -8.0))
    model.eval()
    info = export_onnx(model, tmp_path / "mbv2.onnx", (3, 16, 16))
    assert info.weights["features.2.conv.1.0"]["container"] == "int4"
    assert info.weights["classifier.1"]["container"] == "int8"
    loader = TensorLoader(torch.randn(96, 3, 16, 16), torch.randint(0, 10, (96,)), 32, shuffle=False)
    result = check_parity(model, info.path, loader, "test")
    assert result["weights_bit_exact"] and result["top1_agreement"] >= 0.995, result
    assert result["max_abs_logit_diff"] < 1e-2
    _, inits, numpy_helper = _initializers(info.path)
    stored = numpy_helper.to_array(inits["features.2.conv.1.0.weight_int"]).reshape(-1)
    assert (stored[idx.numpy()] == -8).all()  # frozen weights at their frozen integers


class _WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_unsupported_layer_names_the_module(tmp_path):
    model = quantize_model(_WithGelu(), QuantConfig(weight_bits=4, act_bits=4))
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))
    with pytest.raises(ExportError, match=r"'act' \(GELU\)"):
        export_onnx(model.eval(), tmp_path / "x.onnx", (1, 8, 8))
    assert not (tmp_path / "x.onnx").exists()


def _err(result) -> str:
    return " ".join(result.stderr.split())  # rich wraps long lines


def test_export_cli_bad_input_exits_2(tmp_path, monkeypatch, demo_run):
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run" in _err(result) and "Traceback" not in result.output
    (tmp_path / "junk").mkdir()
    torch.save({"hello": 1}, tmp_path / "junk" / "model.pt")
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "junk")])
    assert result.exit_code == 2 and "not an oscqat model" in _err(result)
    # an unsupported layer inside a registered architecture: exit 2, the module named, nothing written
    run, _ = demo_run
    shutil.copytree(run, tmp_path / "run")
    from oscqat.models import registry
    from oscqat.models.demo_net import DemoNet

    def with_gelu(num_classes, in_chans, weights=None):
        net = DemoNet(num_classes=num_classes, in_chans=in_chans)
        net.stem[2] = nn.GELU()
        return net

    monkeypatch.setitem(registry._MODELS, "demo_net", with_gelu)
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output
    assert "'stem.2' (GELU)" in _err(result) and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "parity.json").exists()


def test_parity_threshold_flag_fails_the_command(demo_run, tmp_path):
    run, _ = demo_run
    result = runner.invoke(app, ["export", "onnx", str(run), "--out", str(tmp_path / "m.onnx"), "--threshold", "1.0",
                                 "--max-batches", "1", "--json"])
    parity = json.loads(result.stdout)["parity"]
    assert (result.exit_code == 0) == (parity["top1_agreement"] >= 1.0)  # 1.0 only passes on perfect agreement


def test_size_and_bops_formula():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Flatten(), nn.Linear(8 * 16, 10))
    fp = model_cost(model, (1, 4, 4))
    macs = 8 * 16 * 1 * 9 + 8 * 16 * 1 * 9 + 128 * 10
    assert fp["bops_g"] == pytest.approx(macs * 32 * 32 / 1e9)
    floats = 72 + 8 * 4 + 72 + 1280 + 10  # conv, BN (weight, bias, mean, var), dw conv, fc weight + bias
    assert fp["model_size_kb"] == pytest.approx(floats * 32 / 8 / 1024)
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))  # first 8/float input, body 4/4, last 8/8
    with torch.no_grad():
        model(torch.randn(2, 1, 4, 4))
    q = model_cost(model, (1, 4, 4))
    assert q["bops_g"] == pytest.approx((8 * 16 * 9 * 8 * 32 + 8 * 16 * 9 * 4 * 4 + 1280 * 8 * 8) / 1e9)
    scales = 3 + 2  # a weight scale per layer, an input scale for the two quantized inputs
    bits = 72 * 8 + 72 * 4 + 1280 * 8 + (8 * 4 + 10 + scales) * 32
    assert model_size_bits(model) == bits
    assert q["model_size_kb"] == pytest.approx(bits / 8 / 1024)


def test_trainer_logs_size_and_bops(demo_run):
    _, report = demo_run
    final = report["final"]
    assert final["model_size_kb"] > 0 and final["bops_g"] > 0
    assert [e["model_size_kb"] for e in report["epochs"]] == [final["model_size_kb"]] * len(report["epochs"])
