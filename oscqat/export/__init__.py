"""Deployment: the trained model a run keeps, its integer QDQ ONNX export and the parity check.

Depends on torch and onnx/onnxruntime only. Names resolve on first use (PEP 562), so the CLI
can mount ``oscqat export`` without importing torch at start-up.
"""

import importlib

_EXPORTS = {
    "TrainedModel": "bundle", "load_trained_model": "bundle", "save_trained_model": "bundle",
    "ExportError": "onnx_export", "ExportInfo": "onnx_export", "export_onnx": "onnx_export",
    "DEFAULT_THRESHOLD": "parity", "check_parity": "parity", "evaluation_split": "parity",
    "weights_bit_exact": "parity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oscqat.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"oscqat.export.{module}"), name)
    globals()[name] = value
    return value
