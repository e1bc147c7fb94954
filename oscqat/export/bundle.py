"""The trained model a run keeps (``model.pt``) and the loader that rebuilds it.

``model.pt`` is one ``torch.save`` of plain data (loadable with ``weights_only=True``): the model
state dict (weights, BN statistics, quantizer scales and signedness, frozen masks and integers),
the ``TrainConfig`` and the input shape. Its ``model`` entry keeps it usable as ``pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from oscqat.config import TrainConfig

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
BUNDLE_FORMAT = "oscqat.model"
BUNDLE_VERSION = 1


@dataclass
class TrainedModel:
    """A rebuilt model in eval mode, with what it was trained from."""

    model: nn.Module
    config: TrainConfig
    num_classes: int
    in_chans: int
    image_size: int | None
    source: Path


def save_trained_model(trainer, path: str | Path) -> Path:
    """Write ``trainer``'s model as a bundle, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = trainer.data
    bundle = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "config": trainer.cfg.model_dump(mode="json"),
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "num_classes": int(data.num_classes), "in_chans": int(data.in_chans), "image_size": int(data.image_size),
        "epoch": int(trainer.epoch),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)
    return path


def resolve_run_file(run: str | Path) -> Path:
    """A run directory (its ``model.pt``, else ``checkpoint.pt``) or a file; FileNotFoundError if none."""
    run = Path(run).expanduser()
    if run.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (run / name).is_file():
                return run / name
        raise FileNotFoundError(f"{run}: no {MODEL_FILE} or {CHECKPOINT_FILE} in this directory (is it an `oscqat train --out` directory?)")
    if not run.is_file():
        raise FileNotFoundError(f"{run}: no such run directory or model file")
    return run


def _infer_io(state: dict) -> tuple[int, int]:
    """``(num_classes, in_chans)`` from a state dict: the last 2-D weight and the first 4-D one."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not convs or not linears:
        raise ValueError("cannot infer the model's input channels and classes from the checkpoint")
    return int(linears[-1].shape[0]), int(convs[0].shape[1])


def build_quantized_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The model ``Trainer`` builds for ``cfg`` (float, then quantized), without weights or data."""
    from oscqat.models import create_model
    from oscqat.quantize import QuantConfig, quantize_model

    model = create_model(cfg.arch, num_classes=num_classes, pretrained=None, in_chans=in_chans)
    if cfg.quantized:
        quantize_model(model, QuantConfig(weight_bits=cfg.weight_bits, act_bits=cfg.act_bits,
                                          per_channel=cfg.per_channel, scale_init=cfg.scale_init))
    return model


def load_trained_model(run: str | Path) -> TrainedModel:
    """Rebuild the trained (quantized) model of a run directory, ``model.pt`` or ``checkpoint.pt``.

    Loads with ``weights_only=True``; the frozen weights come back at their frozen integers and
    the quantizers keep their trained scales (they do not calibrate again). Raises ValueError
    for a file that is not an oscqat model or does not match its config.
    """
    from oscqat.config import ConfigError, validate_config
    from oscqat.models.registry import safe_torch_load

    path = resolve_run_file(run)
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        raise ValueError(f"{path}: not an oscqat model.pt or checkpoint.pt (no 'model' and 'config' entries)")
    data = dict(state["config"])
    data["pretrained"] = None  # the weights are in this file; the original path may be gone
    try:
        cfg = validate_config(TrainConfig, data, source=str(path))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    weights = state["model"]
    if "num_classes" in state:
        num_classes, in_chans, image_size = int(state["num_classes"]), int(state["in_chans"]), state.get("image_size")
    else:
        (num_classes, in_chans), image_size = _infer_io(weights), cfg.image_size
    model = build_quantized_model(cfg, num_classes, in_chans)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {cfg.arch} {cfg.bits} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.eval()
    return TrainedModel(model, cfg, num_classes, in_chans, int(image_size) if image_size else None, path)
