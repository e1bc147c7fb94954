"""Find, read and validate space files; resolve one bit-width into a ``ResolvedSpace``.

Validation happens at load time, for every bit-width in the file, so a campaign fails before Ray
starts rather than on its 40th trial. Every check that can be done statically is: parameter names
are TrainConfig fields, ranges fit the field's own bounds, conditions refer to earlier categorical
or fixed parameters, ``freeze_threshold_end <= freeze_threshold_start`` holds for every sample, and
each starting point is in range and makes a valid TrainConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from oscqat.config import BUILTIN_ARCHS, format_validation_error

from spaces.errors import SpaceError
from spaces.schema import KINDS, AnyParam, BitsSection, ParamSpec, SpaceFileModel, fmt_value
from spaces.fields import coerce_value, field_types
from spaces.space import ResolvedSpace

SHIPPED_DIR = Path(__file__).resolve().parent
RESERVED = {"arch": "the space file's 'arch:' or the campaign target sets it",
            "bits": "each bit-width is its own section under 'bits:'"}
# (low, high) pairs of TrainConfig fields that its validator requires to be ordered low <= high
ORDERED_PAIRS = (("freeze_threshold_end", "freeze_threshold_start"),)

_SPEC_ADAPTER = TypeAdapter(ParamSpec)


# ---------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class SpaceFile:
    """A validated space file: every bit-width it defines, already resolved."""

    name: str
    source: str
    arch: str | None
    description: str
    spaces: dict[str, ResolvedSpace] = field(repr=False)

    @property
    def bits(self) -> list[str]:
        return list(self.spaces)

    def resolve(self, bits: str) -> ResolvedSpace:
        key = str(bits).strip().lower()
        if key not in self.spaces:
            raise SpaceError(f"{self.source}: no bit-width {bits!r} in space {self.name!r}; "
                             f"available: {', '.join(self.spaces)}")
        return self.spaces[key]


def list_spaces() -> list[str]:
    """Names of the spaces shipped with the package (one YAML file each)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def space_path(name_or_path: str | Path) -> Path:
    """A shipped space's file, or the user's file: an existing file or anything that looks like a path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or path.is_file() or path.suffix in (".yaml", ".yml") or "/" in text:
        return path
    if text in list_spaces():
        return SHIPPED_DIR / f"{text}.yaml"
    close = difflib.get_close_matches(text, list_spaces(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpaceError(f"{text}: no such space{hint}; shipped spaces: {', '.join(list_spaces())}; "
                     "or give the path of a YAML file")


def load_space_file(name_or_path: str | Path) -> SpaceFile:
    """Read and validate a whole space file (all bit-widths). Raises SpaceError."""
    path = space_path(name_or_path)
    source = str(path)
    model = _read_model(path)
    arch = model.arch
    if arch is not None and arch not in BUILTIN_ARCHS:
        from oscqat.models import list_models

        if arch not in list_models():
            raise SpaceError(f"{source}: arch {arch!r} is not a known model; choose one of "
                             f"{', '.join(list_models())}, or leave 'arch:' out for an arch-neutral space")
    for pname, raw in model.params.items():  # the base must be valid on its own, not only once merged
        _check_spec(pname, raw, f"{source}: ")
    spaces: dict[str, ResolvedSpace] = {}
    for key, section in model.bits.items():
        bits = _normalise_bits(key, source)
        if bits in spaces:
            raise SpaceError(f"{source}: bit-width {bits!r} is listed twice")
        spaces[bits] = _resolve(model, bits, section or BitsSection(), source, name=model.name or path.stem)
    return SpaceFile(name=model.name or path.stem, source=source, arch=arch,
                     description=model.description.strip(), spaces=spaces)


def load_space(name_or_path: str | Path, bits: str) -> ResolvedSpace:
    """The space ``name_or_path`` (shipped name or YAML path) resolved for ``bits`` (e.g. ``'w3a3'``)."""
    return load_space_file(name_or_path).resolve(bits)


def available_bits(name_or_path: str | Path) -> list[str]:
    """Bit-widths a space defines, in file order."""
    return load_space_file(name_or_path).bits


# ---------------------------------------------------------------------------- reading
def _read_model(path: Path) -> SpaceFileModel:
    from oscqat.config import ConfigError, load_yaml_mapping

    try:
        data = load_yaml_mapping(path)  # yaml.safe_load, with file/empty/not-a-mapping messages
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None
    try:
        return SpaceFileModel.model_validate(data)
    except ValidationError as exc:
        raise SpaceError(format_validation_error(exc, str(path), "space file")) from None


def _normalise_bits(key: Any, source: str) -> str:
    from oscqat.config import parse_bits

    text = str(key).strip().lower()
    try:
        parse_bits(text)
    except ValueError as exc:
        raise SpaceError(f"{source}: bit-width {key!r}: {exc}") from None
    return text


# ---------------------------------------------------------------------------- specs
def _check_spec(name: str, raw: Any, where: str) -> AnyParam:
    """Validate one parameter spec on its own and against its TrainConfig field; return it coerced."""
    from oscqat.config import TrainConfig

    here = f"{where}parameter {name!r}"
    if name in RESERVED:
        raise SpaceError(f"{here}: cannot be searched ({RESERVED[name]})")
    if name not in TrainConfig.model_fields:
        close = difflib.get_close_matches(name, list(TrainConfig.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpaceError(f"{here}: not a TrainConfig field{hint}")
    if not isinstance(raw, dict) or "type" not in raw:
        raise SpaceError(f"{here}: needs a mapping with 'type:' (one of {', '.join(KINDS)})")
    try:
        spec: AnyParam = _SPEC_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise SpaceError(_spec_error(here, exc)) from None
    ftypes = field_types(name)
    if spec.type == "float" and float not in ftypes:
        raise SpaceError(f"{here}: type 'float' does not fit TrainConfig.{name} "
                         f"({'/'.join(sorted(t.__name__ for t in ftypes))}); use int, categorical or fixed")
    if spec.type == "int" and not ftypes & {int, float}:
        raise SpaceError(f"{here}: type 'int' does not fit TrainConfig.{name} "
                         f"({'/'.join(sorted(t.__name__ for t in ftypes))}); use categorical or fixed")
    try:
        if spec.type in ("float", "int"):
            for key in ("low", "high"):
                coerce_value(name, getattr(spec, key))
        elif spec.type == "categorical":
            spec = spec.model_copy(update={"choices": [coerce_value(name, c) for c in spec.choices]})
        else:
            spec = spec.model_copy(update={"value": coerce_value(name, spec.value)})
    except ValueError as exc:
        raise SpaceError(f"{here}: {exc}") from None
    return spec


def _spec_error(here: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"][1:])  # loc[0] is the kind tag
        if err["type"] == "union_tag_invalid":
            msg = f"type must be one of {', '.join(KINDS)}, got {err['input'].get('type')!r}"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown key {err['loc'][-1]!r}"
            loc = ""
        else:
            msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}" if loc else msg)
    return f"{here}: " + "; ".join(problems)


# ---------------------------------------------------------------------------- one bit-width
def _merge(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, override in overrides.items():
        if not isinstance(override, dict) and override is not None:
            raise SpaceError(f"{where}parameter {name!r}: an override must be a mapping (or null to remove it)")
        if override is None:
            if name not in merged:
                raise SpaceError(f"{where}parameter {name!r}: cannot remove it, the base space has no such parameter")
            del merged[name]
        elif "type" in override or name not in merged:
            merged[name] = dict(override)
        else:
            merged[name] = {**merged[name], **override}
    return merged


def _resolve(model: SpaceFileModel, bits: str, section: BitsSection, source: str, name: str) -> ResolvedSpace:
    where = f"{source}: bits {bits}: "
    raw = _merge(model.params, section.params, where)
    params = {pname: _check_spec(pname, spec, where) for pname, spec in raw.items()}
    params = _check_conditions(params, where)
    _check_ordered_pairs(params, where)
    space = ResolvedSpace(name=name, bits=bits, params=params, arch=model.arch, source=source,
                          description=model.description.strip())
    names, points = [], []
    for i, point in enumerate(section.starting_points):
        label = point.get("name")
        if not isinstance(label, str) or not label:
            raise SpaceError(f"{where}starting point #{i + 1}: needs a 'name:'")
        if label in names:
            raise SpaceError(f"{where}starting point {label!r} is listed twice")
        values = space.check_point({k: v for k, v in point.items() if k != "name"},
                                   label=f"starting point {label!r}")
        try:
            space.to_train_config(values)
        except SpaceError as exc:  # drop the "<source>: invalid configuration" header line
            detail = str(exc).split("\n", 1)[-1]
            raise SpaceError(f"{where}starting point {label!r} is not a valid TrainConfig:\n{detail}") from None
        names.append(label)
        points.append(values)
    return dataclasses.replace(space, starting_point_names=names, _points=points)


def _check_conditions(params: dict[str, AnyParam], where: str) -> dict[str, AnyParam]:
    """Check every condition; return the specs with condition values coerced to the parent's type."""
    order = list(params)
    checked: dict[str, AnyParam] = {}
    for name, spec in params.items():
        when = {}
        for parent, allowed in spec.when.items():
            here = f"{where}parameter {name!r}: condition on {parent!r}"
            if parent not in params:
                raise SpaceError(f"{here}: unknown parameter; the space has {', '.join(order)}")
            if order.index(parent) > order.index(name):
                raise SpaceError(f"{here}: {parent!r} must be declared before {name!r}")
            pspec = params[parent]
            if pspec.type not in ("categorical", "fixed"):
                raise SpaceError(f"{here}: conditions can only test categorical or fixed parameters, "
                                 f"{parent!r} is {pspec.type}")
            try:
                values = [coerce_value(parent, v) for v in allowed]
            except ValueError as exc:
                raise SpaceError(f"{here}: {exc}") from None
            possible = pspec.choices if pspec.type == "categorical" else [pspec.value]
            if not any(v in possible for v in values):
                raise SpaceError(f"{here}: none of {', '.join(fmt_value(v) for v in values)} can occur "
                                 f"({parent!r} takes {', '.join(fmt_value(v) for v in possible)}), so "
                                 f"{name!r} would never be sampled; fix the condition or remove it with null")
            when[parent] = values
        checked[name] = spec.model_copy(update={"when": when}) if when else spec
    return checked


def _check_ordered_pairs(params: dict[str, AnyParam], where: str) -> None:
    """Refuse spaces where a sample could break ``low_field <= high_field`` (TrainConfig would reject it).

    A field that is absent, or active under a different condition than its partner, can take its
    TrainConfig default while the partner is sampled, so the default counts as a possible value.
    """
    from oscqat.config import TrainConfig

    for lo_name, hi_name in ORDERED_PAIRS:
        lo_spec, hi_spec = params.get(lo_name), params.get(hi_name)
        if lo_spec is None and hi_spec is None:
            continue
        same = lo_spec is not None and hi_spec is not None and lo_spec.when == hi_spec.when
        lo_max = max(_possible(lo_spec, TrainConfig.model_fields[lo_name].default, same))
        hi_min = min(_possible(hi_spec, TrainConfig.model_fields[hi_name].default, same))
        if lo_max > hi_min:
            raise SpaceError(
                f"{where}parameters {lo_name!r} and {hi_name!r}: {lo_name} can reach {fmt_value(lo_max)} while "
                f"{hi_name} can be as low as {fmt_value(hi_min)}; TrainConfig requires {lo_name} <= {hi_name}, "
                f"so keep {lo_name}'s high at or below {hi_name}'s low (and give both the same condition)")


def _possible(spec: AnyParam | None, default: float, same_condition: bool) -> list[float]:
    """Extreme numeric values a field can take in a trial config."""
    values: list[Any] = []
    if spec is not None:
        if spec.type in ("float", "int"):
            values = [spec.low, spec.high]
        else:
            values = spec.choices if spec.type == "categorical" else [spec.value]
            values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if spec is None or (spec.when and not same_condition):
        values.append(default)
    return values


__all__ = ["SHIPPED_DIR", "SpaceFile", "available_bits", "coerce_value", "list_spaces", "load_space",
           "load_space_file", "space_path"]
