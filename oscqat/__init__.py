"""oscqat: oscillation-aware quantization-aware training (Nagel et al., ICML 2022).

LSQ fake quantization with the straight-through estimator, oscillation tracking, dampening,
iterative weight freezing and BN re-estimation. Depends on torch/torchvision/timm only.
"""

from oscqat.bn import reestimate_bn
from oscqat.config import ConfigError, TrainConfig, parse_bits
from oscqat.dampening import dampening_loss
from oscqat.layers import QuantConv2d, QuantLinear, QuantMixin, quant_layers, register_quantized
from oscqat.models import create_model, list_models
from oscqat.oscillation import OscillationTracker
from oscqat.quantize import QuantConfig, layer_bits, quantize_model
from oscqat.quantizer import LSQQuantizer, grid_bounds, lsq_fake_quant
from oscqat.trainer import METRIC_NAMES, NonFiniteLossError, Trainer

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LSQQuantizer", "METRIC_NAMES", "NonFiniteLossError", "OscillationTracker", "QuantConfig",
    "QuantConv2d", "QuantLinear", "QuantMixin", "TrainConfig", "Trainer", "create_model", "dampening_loss",
    "grid_bounds", "layer_bits", "list_models", "lsq_fake_quant", "parse_bits", "quant_layers",
    "quantize_model", "reestimate_bn", "register_quantized",
]
