"""Parity of an exported ONNX model with the fake-quantized PyTorch model it came from.

ONNX Runtime (CPU) and the PyTorch model see the same evaluation images; the result says how
often their top-1 agrees, each one's top-1 accuracy, the logit differences, and whether every
integer weight in the file equals the model's ``weight_int()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oscqat.layers import QuantMixin

DEFAULT_THRESHOLD = 0.995
PARITY_FILE = "parity.json"


def evaluation_split(data) -> tuple[str, object]:
    """The held-out split parity is measured on: ``test`` where the data has one, else ``val``."""
    test = getattr(data, "test", None)
    return ("test", test) if test is not None else ("val", data.val)


def onnx_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """``{layer: integer weights}`` as stored in the file (int4 unpacked to int64)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    layers = json.loads(meta.get("oscqat.weights", "{}"))
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for layer, info in layers.items():
        tensor = inits.get(info["initializer"])
        if tensor is None:
            raise ValueError(f"{onnx_path}: integer weight {info['initializer']!r} of {layer!r} is missing")
        out[layer] = numpy_helper.to_array(tensor).astype(np.int64)
    return out


def weights_bit_exact(model: nn.Module, onnx_path: str | Path) -> tuple[bool, list[str]]:
    """Does every quantized layer's ONNX weight equal ``weight_int()``? Also returns the layers that differ."""
    stored = onnx_weights(onnx_path)
    bad = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantMixin):
            continue
        want = layer.weight_int().cpu().numpy().astype(np.int64)
        got = stored.get(name)
        if got is None or got.shape != want.shape or not np.array_equal(got, want):
            bad.append(name)
    return not bad, bad


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: str | Path, loader, split: str = "test",
                 threshold: float = DEFAULT_THRESHOLD, max_batches: int | None = None) -> dict:
    """Run both models over ``loader``; returns the ``parity.json`` dict (``passed`` included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    model.eval()
    device = next(model.parameters()).device
    seen = agree = torch_correct = onnx_correct = 0
    max_diff, diff_sum, diff_count = 0.0, 0.0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ref = model(x.to(device)).float().cpu().numpy()
        got = session.run(None, {input_name: x.float().cpu().numpy()})[0]
        diff = np.abs(ref - got)
        max_diff = max(max_diff, float(diff.max()))
        diff_sum += float(diff.sum())
        diff_count += diff.size
        y = y.cpu().numpy()
        ref_top, got_top = ref.argmax(1), got.argmax(1)
        agree += int((ref_top == got_top).sum())
        torch_correct += int((ref_top == y).sum())
        onnx_correct += int((got_top == y).sum())
        seen += len(y)
    if seen == 0:
        raise ValueError("the evaluation split is empty")
    exact, differing = weights_bit_exact(model, onnx_path)
    result = {
        "split": split, "samples": seen,
        "top1_agreement": agree / seen,
        "onnx_test_top1": onnx_correct / seen,
        "torch_test_top1": torch_correct / seen,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": diff_sum / max(diff_count, 1),
        "weights_bit_exact": exact,
        "weights_differing": differing,
        "threshold": threshold,
        "onnxruntime": ort.__version__,
    }
    result["passed"] = bool(exact and result["top1_agreement"] >= threshold)
    return result
