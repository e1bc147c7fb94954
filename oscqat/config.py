"""Training configuration: one pydantic model that is also the exported best-config format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

METHODS = ("lsq", "dampen", "freeze", "dampen+freeze")
# The one definition of the dataset names (TrainConfig and campaigns both use it).
DatasetName = Literal["digits", "digits_hard", "cifar10", "imagefolder", "synthetic"]
DATASETS = get_args(DatasetName)
# Old field names still accepted on input (YAML written before the rename keeps working).
FIELD_ALIASES = {"val_fraction": "selection_fraction"}
_BITS_RE = re.compile(r"^w(\d+)(?:a(\d+))?$")


class ConfigError(ValueError):
    """A user-supplied configuration is invalid; the message names the field."""


def parse_bits(bits: str) -> tuple[int | None, int | None]:
    """'w3a3' -> (3, 3); 'w4' -> (4, None) (weights only); 'fp32' -> (None, None)."""
    text = bits.strip().lower()
    if text in ("fp32", "fp", "float"):
        return None, None
    match = _BITS_RE.match(text)
    if not match:
        raise ValueError(f"bits must look like 'w4a4', 'w4a8', 'w4' or 'fp32', got {bits!r}")
    wbits = int(match.group(1))
    abits = int(match.group(2)) if match.group(2) is not None else None
    for name, value in (("weight", wbits), ("activation", abits)):
        if value is not None and not 2 <= value <= 8:
            raise ValueError(f"{name} bits must be between 2 and 8, got {value} in {bits!r}")
    return wbits, abits


def method_dampens(method: str) -> bool:
    """Whether a ``method`` uses oscillation dampening (the one place that spells it)."""
    return "dampen" in method


def method_freezes(method: str) -> bool:
    """Whether a ``method`` uses iterative weight freezing."""
    return "freeze" in method


# The registry's built-in names, known without importing torch (the registry imports it), so that
# read-only commands validating a campaign start fast. tests/test_models_names.py keeps it in step.
BUILTIN_ARCHS = ("demo_net", "efficientnet_lite0", "mini_mobilenet_v2", "mobilenet_v2", "mobilenet_v3_large",
                 "mobilenet_v3_small", "resnet18")


def check_arch(name: str) -> str:
    """Validator shared by every config naming an architecture."""
    if name in BUILTIN_ARCHS:
        return name
    from oscqat.models import list_models

    if name not in list_models():
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(list_models())}")
    return name


class TrainConfig(BaseModel):
    """Everything one QAT (or FP) training run needs. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model and quantization
    arch: str = "demo_net"
    bits: str = "w4a4"
    per_channel: bool = False
    scale_init: Literal["mse", "minmax"] = "mse"
    pretrained: str | None = None

    # data
    dataset: DatasetName = "digits"
    data_dir: str | None = Field(default=None, validate_default=True)  # checked against dataset
    download: bool = False
    image_size: int | None = Field(default=None, gt=0, le=1024)
    # share of the training data held out as the selection split (val_top1); the test split is
    # separate (digits/digits_hard: fixed 20% of the source digits; cifar10/imagefolder: their test/val set)
    selection_fraction: float = Field(default=0.2, gt=0.0, lt=1.0,
                                      validation_alias=AliasChoices("selection_fraction", "val_fraction"))
    # DataLoader workers (cifar10, imagefolder); None: 0 on CPU, the trial's CPU share - 1 on a GPU
    num_workers: int | None = Field(default=None, ge=0, le=64)

    # optimisation
    epochs: int = Field(default=20, gt=0, le=10_000)
    batch_size: int = Field(default=64, gt=0, le=65_536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-5, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    quantizer_lr: float = Field(default=1e-5, ge=0.0, le=10.0)

    # oscillation remedies (METHOD.md sections 2-4)
    method: Literal["lsq", "dampen", "freeze", "dampen+freeze"] = "lsq"
    dampen_lambda: float = Field(default=0.1, ge=0.0, le=1e4)
    dampen_start: float = Field(default=0.25, ge=0.0, lt=1.0)
    dampen_aggregation: Literal["kernel_mean", "sum", "mean"] = "kernel_mean"
    freeze_threshold_start: float = Field(default=0.1, gt=0.0, le=1.0)
    freeze_threshold_end: float = Field(default=0.01, gt=0.0, le=1.0)
    freeze_start: float = Field(default=0.25, ge=0.0, lt=1.0)
    osc_momentum: float = Field(default=1e-3, gt=0.0, le=1.0)
    track_max_bits: int = Field(default=4, ge=2, le=8)

    # evaluation
    bn_reestimate_batches: int = Field(default=50, ge=0, le=100_000)

    # runtime
    seed: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False
    # run the training forward + backward through torch.compile (Inductor): compiled once per
    # run, at its second step; eager is the reference (see README, Performance)
    compile: bool = False
    # layout of the image batches: "auto" is channels_last on CUDA (cuDNN's NHWC convolutions:
    # 1.90x eager FP32 throughput on an H200, docs/BENCHMARKS.md section 4) and NCHW on the CPU
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: str) -> str:
        parse_bits(value)
        return value.strip().lower()

    @field_validator("arch")
    @classmethod
    def _check_arch(cls, value: str) -> str:
        return check_arch(value)

    # Field validators, not a model validator, so an error is labelled with the field it is about
    # (a model validator's errors have no location). `info.data` holds the fields declared above.
    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            from oscqat.models import is_library_weight_name

            if not is_library_weight_name(value):
                raise ValueError(f"{value!r} is neither a file nor a known weight name")
        return value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("dataset") == "imagefolder":
            if not value:
                raise ValueError("required for dataset 'imagefolder'")
            if not Path(value).expanduser().is_dir():
                raise ValueError(f"{value!r} does not exist or is not a directory")
        return value

    @field_validator("freeze_threshold_end")
    @classmethod
    def _check_freeze_end(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("freeze_threshold_start")
        if start is not None and value > start:
            raise ValueError(f"{value} must not exceed freeze_threshold_start ({start})")
        return value

    # convenience -------------------------------------------------------
    @property
    def weight_bits(self) -> int | None:
        return parse_bits(self.bits)[0]

    @property
    def act_bits(self) -> int | None:
        return parse_bits(self.bits)[1]

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def dampens(self) -> bool:
        return self.quantized and method_dampens(self.method)

    @property
    def freezes(self) -> bool:
        return self.quantized and method_freezes(self.method)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Load a YAML file; raises ConfigError with a readable message on any problem."""
        data = load_yaml_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate_config(cls, data, source=str(path))


def load_yaml_mapping(path: str | Path, max_bytes: int = 1 << 20) -> dict:
    """Read a YAML file that must hold a mapping, with errors a user can act on.

    Config files are small: a file over ``max_bytes`` (1 MiB) is refused before parsing (a 24 MB
    list took minutes and gigabytes to parse), and a key given twice in one mapping is refused
    (``yaml.safe_load`` would silently keep the last one).
    """

    class _UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
                try:
                    seen.add(key)
                except TypeError:  # an unhashable key; the base class reports it
                    pass
            return super().construct_mapping(node, deep=deep)

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{path}: file is {size:,} bytes; config files are limited to {max_bytes:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader: no tags that construct Python objects
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if data is None:
        raise ConfigError(f"{path}: file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def format_validation_error(exc, source: str, what: str = "configuration") -> str:
    """Turn a pydantic ValidationError into lines that name each offending field."""
    lines = [f"{source}: invalid {what}"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")  # no location: the message names its fields
    return "\n".join(lines)


def validate_config(model_cls, data: dict, source: str = "config"):
    """Validate `data` against `model_cls`, re-raising as ConfigError with field names."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
