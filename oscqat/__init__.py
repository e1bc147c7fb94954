"""oscqat: oscillation-aware quantization-aware training (Nagel et al., ICML 2022).

LSQ fake quantization with the straight-through estimator, oscillation tracking, dampening,
iterative weight freezing and BN re-estimation. Depends on torch/torchvision/timm only.
"""

import importlib

# Public names -> defining module, imported on first use (PEP 562): ``oscqat --help`` and the
# config-only commands then start without loading torch (about 3 s).
_EXPORTS = {
    "reestimate_bn": "bn", "ConfigError": "config", "TrainConfig": "config", "parse_bits": "config",
    "dampening_loss": "dampening", "QuantConv2d": "layers", "QuantLinear": "layers", "QuantMixin": "layers",
    "quant_layers": "layers", "register_quantized": "layers", "create_model": "models", "list_models": "models",
    "OscillationTracker": "oscillation", "QuantConfig": "quantize", "layer_bits": "quantize",
    "quantize_model": "quantize", "LSQQuantizer": "quantizer", "grid_bounds": "quantizer",
    "lsq_fake_quant": "quantizer", "METRIC_NAMES": "trainer", "NonFiniteLossError": "trainer", "Trainer": "trainer",
    "QuantizerCollapseError": "trainer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (``oscqat.layers`` after a plain ``import oscqat``)
        try:
            return importlib.import_module(f"oscqat.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"oscqat.{name}":
                raise
            raise AttributeError(f"module 'oscqat' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"oscqat.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)  # the lazy-export table is the one list of public names
