"""Named model constructors (timm-style registry) and pretrained-weight loading."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Library weight names per arch: loading one downloads only when explicitly asked for.
_LIBRARY_WEIGHTS = {
    "mobilenet_v2": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "mobilenet_v3_small": ("IMAGENET1K_V1",),
    "mobilenet_v3_large": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "resnet18": ("IMAGENET1K_V1",),
    "efficientnet_lite0": ("timm",),
}


# Small nets built for the offline digits benchmarks: they take the 1-channel images as they are.
_GRAYSCALE = set()


def register_model(name: str, grayscale: bool = False):
    def wrap(fn):
        _MODELS[name] = fn
        if grayscale:
            _GRAYSCALE.add(name)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def is_grayscale_model(name: str) -> bool:
    """True for nets that see digits as 1 channel (the others get it repeated over RGB)."""
    return name in _GRAYSCALE


def is_library_weight_name(name: str) -> bool:
    return any(name in names for names in _LIBRARY_WEIGHTS.values())


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first Conv2d for one taking ``in_chans`` channels (weights averaged over RGB)."""
    if in_chans == 3:
        return
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            with torch.no_grad():
                new.weight.copy_(mod.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return


@register_model("demo_net", grayscale=True)
def _demo_net(num_classes: int, in_chans: int, weights=None) -> nn.Module:
    from oscqat.models.demo_net import DemoNet

    if weights is not None:
        raise ValueError("demo_net has no library weights; pass a checkpoint path")
    return DemoNet(num_classes=num_classes, in_chans=in_chans)


@register_model("mini_mobilenet_v2", grayscale=True)
def _mini_mobilenet_v2(num_classes: int, in_chans: int, weights=None) -> nn.Module:
    from oscqat.models.mini_mobilenet_v2 import MiniMobileNetV2

    if weights is not None:
        raise ValueError("mini_mobilenet_v2 has no library weights; pass a checkpoint path")
    return MiniMobileNetV2(num_classes=num_classes, in_chans=in_chans)


def _torchvision(builder_name: str):
    def build(num_classes: int, in_chans: int, weights=None) -> nn.Module:
        import torchvision.models as tvm

        builder = getattr(tvm, builder_name)
        if weights is not None:  # library weights: ImageNet head, then replaced
            model = builder(weights=weights)
            _reset_classifier(model, num_classes)
        else:
            model = builder(num_classes=num_classes)
        _replace_first_conv(model, in_chans)
        return model

    return build


def _reset_classifier(model: nn.Module, num_classes: int) -> None:
    last_name, last = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = name, mod
    if last is not None and last.out_features != num_classes:
        parent_name, _, child = last_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Linear(last.in_features, num_classes, last.bias is not None))


for _name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18"):
    register_model(_name)(_torchvision(_name))


@register_model("efficientnet_lite0")
def _efficientnet_lite0(num_classes: int, in_chans: int, weights=None) -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=weights is not None,
                             num_classes=num_classes, in_chans=in_chans)


def create_model(name: str, num_classes: int = 1000, pretrained: str | None = None, in_chans: int = 3) -> nn.Module:
    """Build a float model by name.

    ``pretrained`` is a local checkpoint path (a state dict saved with ``torch.save``, loaded
    with ``weights_only=True``; an ``oscqat`` training checkpoint works too) or a library weight
    name such as ``IMAGENET1K_V1`` (this downloads, so only use it where the network allows).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    weights = None
    path = Path(pretrained).expanduser() if pretrained else None
    if pretrained and not path.is_file():
        if pretrained not in _LIBRARY_WEIGHTS.get(name, ()):
            raise ValueError(f"pretrained {pretrained!r} is neither a file nor a weight name of {name}")
        weights = pretrained
    model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, weights=weights)
    if path is not None and path.is_file():
        load_float_weights(model, path)
    return model


def safe_torch_load(path: str | Path):
    """``torch.load(..., weights_only=True)``; a file that needs arbitrary unpickling (code objects,
    ``__reduce__`` payloads) is refused with a ValueError naming the file, and nothing in it runs."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise ValueError(f"{path}: refused to load: not a plain tensor checkpoint (weights_only=True). {detail}") from None


def load_float_weights(model: nn.Module, path: str | Path) -> None:
    """Load a float state dict (or the ``model`` entry of a training checkpoint) strictly."""
    state = safe_torch_load(path)
    load_state_into(model, state, source=str(path))


def load_state_into(model: nn.Module, state, source: str = "checkpoint") -> None:
    """Strictly load a float state dict (or a training checkpoint's ``model`` entry)."""
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    path = source
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {len(missing)} keys, e.g. "
            f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})"
        )
