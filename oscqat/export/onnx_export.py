"""Integer QDQ ONNX export of a fake-quantized model (torch.fx trace -> ONNX nodes, no exporter magic).

What the graph holds, per quantized conv/linear:
- its weight as an integer initializer ``<layer>.weight_int`` (INT4, two values a byte, when
  ``weight_bits <= 4``; INT8 otherwise) equal to ``weight_int()`` (frozen weights at their frozen
  integers), its scale ``<layer>.weight_scale`` (per tensor, or per output channel on axis 0),
  and a DequantizeLinear feeding the Conv/Gemm;
- its input quantizer as QuantizeLinear -> DequantizeLinear with the trained scale, zero point 0,
  in a (u)int8 container; where the grid [n, p] is smaller than the container (2-7 bits) a Clip
  to [s*n, s*p] follows, so the values are exactly ``s * clamp(round(x / s), n, p)``.
BatchNorm stays a BatchNormalization node after the conv: the fake-quantized model runs the conv
on ``s * x_int`` and then a float BN, and folding BN would move the weights off the integer grid.
Everything else must be one of the few modules/functions below; anything else is an
``ExportError`` naming the module.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from oscqat.layers import QuantMixin

OPSET = 21  # the first opset with INT4/UINT4 QuantizeLinear/DequantizeLinear (ONNX 1.16, ORT CPU >= 1.18)
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(ValueError):
    """The model holds a layer or operation the exporter does not translate (the message names it)."""


@dataclass
class ExportInfo:
    """What was written: the integer initializer of each quantized layer and its bit-widths."""

    path: Path
    weights: dict[str, dict] = field(default_factory=dict)  # layer -> {initializer, bits, container}
    opset: int = OPSET


class _Tracer(fx.Tracer):
    """Quantized layers, BatchNorm (timm's BatchNormAct2d included) and torch.nn modules (the
    default) are leaves: each becomes one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantMixin, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _where(n: fx.Node) -> str:
    """The module an fx node was traced in (``features.3.conv``), for error messages."""
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].rstrip("'>"))
        return f"{n.name} in module {path!r} ({name})"
    return n.name


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


class _Builder:
    def __init__(self, model: nn.Module, int4: bool):
        import onnx  # noqa: F401 - fail early when the optional dependency is missing

        self.model, self.int4 = model, int4
        self.nodes, self.inits, self.env, self.count = [], [], {}, 0
        self.weights: dict[str, dict] = {}

    # helpers -----------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint.split(' ', 1)[0]}_{self.count}"  # hint may be an error location ("add_1 in module ...")

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def int_tensor(self, name: str, values: np.ndarray, container: int) -> str:
        from onnx import helper

        self.inits.append(helper.make_tensor(name, container, list(values.shape), values.reshape(-1).astype(np.int64).tolist()))
        return name

    # quantization ------------------------------------------------------------------
    def quant_input(self, x: str, q, prefix: str) -> str:
        """QuantizeLinear -> DequantizeLinear (-> Clip) with the layer's input quantizer."""
        from onnx import TensorProto, helper

        n, p = q.bounds
        # Activations always use 8-bit containers: ONNX Runtime 1.31's ClipQuantFusion pass fails on
        # a (u)int4 QuantizeLinear that follows a Clip/Relu ("Unexpected data type for QuantizeLinear
        # input y_zero_point"), i.e. on every ReLU6 -> 4-bit input in these networks.
        container, (lo, hi) = (TensorProto.INT8, (-128, 127)) if q.signed else (TensorProto.UINT8, (0, 255))
        scale = np.float32(_np(q.scale).reshape(()))
        s = self.const(f"{prefix}.input_scale", np.array(scale, np.float32))
        zp = f"{prefix}.input_zero_point"
        self.inits.append(helper.make_tensor(zp, container, [], [0]))
        xq = self.node("QuantizeLinear", [x, s, zp], f"{prefix}.input_q")
        xd = self.node("DequantizeLinear", [xq, s, zp], f"{prefix}.input_dq")
        if (n, p) != (lo, hi):  # keep the trained grid exactly inside the wider container
            lo_c = self.const(f"{prefix}.input_min", np.array(np.float32(scale) * np.float32(n), np.float32))
            hi_c = self.const(f"{prefix}.input_max", np.array(np.float32(scale) * np.float32(p), np.float32))
            xd = self.node("Clip", [xd, lo_c, hi_c], f"{prefix}.input_clip")
        return xd

    def quant_weight(self, m: QuantMixin, prefix: str) -> str:
        from onnx import TensorProto

        w_int = _np(m.weight_int(), np.float64)
        if not np.all(np.abs(w_int) <= 128):
            raise ExportError(f"{prefix}: integer weights outside the int8 range")
        container = TensorProto.INT4 if (m.weight_bits <= 4 and self.int4) else TensorProto.INT8
        name = self.int_tensor(f"{prefix}.weight_int", np.rint(w_int).astype(np.int8), container)
        scale = _np(m.weight_quantizer.scale)
        s = self.const(f"{prefix}.weight_scale", scale.reshape(-1) if scale.size > 1 else scale.reshape(()))
        attrs = {"axis": 0} if scale.size > 1 else {}
        self.weights[prefix] = {"initializer": name, "bits": m.weight_bits,
                                "container": "int4" if container == TensorProto.INT4 else "int8"}
        return self.node("DequantizeLinear", [name, s], f"{prefix}.weight_dq", **attrs)

    # layers ------------------------------------------------------------------------
    def _layer_inputs(self, m: nn.Module, x: str, prefix: str) -> list[str]:
        """A conv/linear's inputs: the (QDQ-quantized, if quantized) input, the integer or float
        weight, and the bias when it has one."""
        if isinstance(m, QuantMixin):
            if m.input_quantizer is not None:
                x = self.quant_input(x, m.input_quantizer, prefix)
            w = self.quant_weight(m, prefix)
        else:
            w = self.const(f"{prefix}.weight", _np(m.weight))
        return [x, w] + ([self.const(f"{prefix}.bias", _np(m.bias))] if m.bias is not None else [])

    def conv(self, m: nn.Conv2d, x: str, prefix: str) -> str:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ExportError(f"{prefix}: Conv2d padding {m.padding!r} / padding_mode {m.padding_mode!r} is not supported")
        inputs = self._layer_inputs(m, x, prefix)
        ph, pw = m.padding
        return self.node("Conv", inputs, prefix, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                         pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups)

    def linear(self, m: nn.Linear, x: str, prefix: str) -> str:
        inputs = self._layer_inputs(m, x, prefix)
        return self.node("Gemm", inputs, prefix, transB=1)

    def batchnorm(self, m: nn.BatchNorm2d, x: str, prefix: str) -> str:
        if not m.track_running_stats or m.running_mean is None:
            raise ExportError(f"{prefix}: BatchNorm without running statistics is not supported")
        c = m.num_features
        weight = _np(m.weight) if m.weight is not None else np.ones(c, np.float32)
        bias = _np(m.bias) if m.bias is not None else np.zeros(c, np.float32)
        names = [self.const(f"{prefix}.{k}", v) for k, v in (("weight", weight), ("bias", bias),
                 ("running_mean", _np(m.running_mean)), ("running_var", _np(m.running_var)))]
        return self.node("BatchNormalization", [x, *names], prefix, epsilon=float(m.eps))

    def clip(self, x: str, lo: float, hi: float, prefix: str) -> str:
        lo_c = self.const(self.fresh(f"{prefix}.min"), np.array(lo, np.float32))
        hi_c = self.const(self.fresh(f"{prefix}.max"), np.array(hi, np.float32))
        return self.node("Clip", [x, lo_c, hi_c], prefix)

    def module(self, m: nn.Module, args: list, kwargs: dict, prefix: str) -> str:
        x = args[0]
        if isinstance(m, nn.Conv2d):
            return self.conv(m, x, prefix)
        if isinstance(m, nn.Linear):
            return self.linear(m, x, prefix)
        if isinstance(m, nn.BatchNorm2d):
            y = self.batchnorm(m, x, prefix)
            for sub in ("drop", "act"):  # timm's BatchNormAct2d: BN, then dropout and activation
                if isinstance(getattr(m, sub, None), nn.Module):
                    y = self.module(getattr(m, sub), [y], {}, f"{prefix}.{sub}")
            return y
        if isinstance(m, nn.ReLU6):
            return self.clip(x, 0.0, 6.0, prefix)
        if isinstance(m, nn.Hardtanh):
            return self.clip(x, float(m.min_val), float(m.max_val), prefix)
        if isinstance(m, nn.ReLU):
            return self.node("Relu", [x], prefix)
        if isinstance(m, nn.Hardswish):
            return self.node("HardSwish", [x], prefix)
        if isinstance(m, nn.Hardsigmoid):
            return self.node("HardSigmoid", [x], prefix, alpha=1.0 / 6.0, beta=0.5)
        if isinstance(m, nn.Sigmoid):
            return self.node("Sigmoid", [x], prefix)
        if isinstance(m, nn.SiLU):
            return self.node("Mul", [x, self.node("Sigmoid", [x], prefix + ".sigmoid")], prefix)
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(x, m.start_dim, m.end_dim, prefix)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.global_pool(x, m.output_size, prefix)
        if isinstance(m, nn.MaxPool2d):
            k, s, p = (v if isinstance(v, tuple) else (v, v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
            d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation, m.dilation)
            return self.node("MaxPool", [x], prefix, kernel_shape=list(k), strides=list(s),
                             pads=[p[0], p[1], p[0], p[1]], dilations=list(d), ceil_mode=int(m.ceil_mode))
        raise ExportError(f"unsupported layer {prefix!r} ({type(m).__name__}): the ONNX exporter translates "
                          "Conv2d, Linear (quantized or float), BatchNorm2d, ReLU/ReLU6/Hardtanh/Hardswish/"
                          "Hardsigmoid/Sigmoid/SiLU, Dropout/Identity, Flatten, AdaptiveAvgPool2d(1), MaxPool2d")

    def flatten(self, x: str, start: int, end: int, where: str) -> str:
        if end != -1 or start < 1:
            raise ExportError(f"{where}: flatten(start_dim={start}, end_dim={end}) is not supported (only start_dim>=1, end_dim=-1)")
        return self.node("Flatten", [x], where, axis=int(start))

    def global_pool(self, x: str, size, where: str) -> str:
        if size not in (1, (1, 1), [1, 1]):
            raise ExportError(f"{where}: adaptive average pooling to {size} is not supported (only to 1x1)")
        return self.node("GlobalAveragePool", [x], where)

    def function(self, fn, args: list, kwargs: dict, where: str) -> str:
        def name(a):
            if isinstance(a, str):
                return a
            if isinstance(a, (int, float)):
                return self.const(self.fresh(f"{where}.const"), np.array(a, np.float32))
            raise ExportError(f"{where}: unsupported argument {a!r}")

        if fn in (operator.add, torch.add) and len(args) == 2 and not kwargs:
            return self.node("Add", [name(args[0]), name(args[1])], where)
        if fn in (operator.mul, torch.mul) and len(args) == 2 and not kwargs:
            return self.node("Mul", [name(args[0]), name(args[1])], where)
        if fn is torch.flatten:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, where)
        if fn is F.adaptive_avg_pool2d:
            return self.global_pool(args[0], args[1] if len(args) > 1 else kwargs.get("output_size"), where)
        if fn in (F.relu, torch.relu):
            return self.node("Relu", [args[0]], where)
        if fn is F.relu6:
            return self.clip(args[0], 0.0, 6.0, where)
        if fn is F.hardswish:
            return self.node("HardSwish", [args[0]], where)
        if fn is F.hardsigmoid:
            return self.node("HardSigmoid", [args[0]], where, alpha=1.0 / 6.0, beta=0.5)
        if fn in (torch.sigmoid, F.sigmoid):
            return self.node("Sigmoid", [args[0]], where)
        if fn is torch.cat:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self.node("Concat", list(args[0]), where, axis=int(dim))
        raise ExportError(f"unsupported operation {getattr(fn, '__name__', fn)!r} at {where}")

    def method(self, meth: str, args: list, kwargs: dict, where: str) -> str:
        if meth == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, where)
        if meth == "relu":
            return self.node("Relu", [args[0]], where)
        if meth == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            if dims is None:
                raise ExportError(f"{where}: mean over all dimensions is not supported")
            dims = [dims] if isinstance(dims, int) else list(dims)
            axes = self.const(self.fresh(f"{where}.axes"), np.array(dims, np.int64))
            return self.node("ReduceMean", [args[0], axes], where, keepdims=int(keep))
        raise ExportError(f"unsupported tensor method .{meth}() at {where}")

    # graph ---------------------------------------------------------------------------
    def run(self, graph: fx.Graph, modules: dict[str, nn.Module]) -> str:
        out = None
        for n in graph.nodes:
            args = fx.node.map_arg(n.args, lambda a: self.env[a.name])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env[a.name])
            if n.op == "placeholder":
                if self.env:
                    raise ExportError(f"the model's forward takes more than one input ({n.name!r})")
                self.env[n.name] = INPUT_NAME
            elif n.op == "call_module":
                self.env[n.name] = self.module(modules[n.target], list(args), dict(kwargs), n.target)
            elif n.op == "call_function":
                self.env[n.name] = self.function(n.target, list(args), dict(kwargs), _where(n))
            elif n.op == "call_method":
                self.env[n.name] = self.method(n.target, list(args), dict(kwargs), _where(n))
            elif n.op == "output":
                out = args[0]
            else:
                raise ExportError(f"unsupported graph node {n.op} {n.target!r} ({n.name})")
        if not isinstance(out, str):
            raise ExportError("the model must return one tensor (the logits)")
        return out


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of ``model`` with quantized layers as leaves; ExportError when untraceable."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types for data-dependent control flow
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return fx.GraphModule(model, graph)


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], *,
                int4: bool = True, metadata: dict[str, str] | None = None) -> ExportInfo:
    """Write ``model`` (in eval mode, quantizers calibrated) as integer QDQ ONNX to ``path``.

    ``input_shape`` (C, H, W) fixes the channels and checks the graph; batch, height and width
    stay dynamic. ``int4=False`` stores every integer in int8 containers (for runtimes without
    INT4). Nothing is written when the model cannot be exported.
    """
    import onnx
    from onnx import TensorProto, helper

    model.eval()
    if any(isinstance(m, QuantMixin) and not bool(m.weight_quantizer.initialized) for m in model.modules()):
        raise ExportError("the model's quantizers are not calibrated (export a trained model)")
    gm = trace(model)
    builder = _Builder(model, int4)
    out = builder.run(gm.graph, dict(gm.named_modules()))
    with torch.no_grad():
        num_classes = int(model(torch.zeros(1, *input_shape, device=next(model.parameters()).device)).shape[1])
    builder.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        builder.nodes, "oscqat",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", input_shape[0], "height", "width"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])],
        builder.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="oscqat")
    proto.ir_version = 10  # opset 21 needs IR 10; ONNX Runtime 1.18+ reads it
    meta = {"oscqat.weights": json.dumps(builder.weights), **(metadata or {})}
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return ExportInfo(path=path, weights=builder.weights)
