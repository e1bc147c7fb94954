"""TrainConfig field adapters: what type and bounds a space parameter must have.

Its own module so that ``spaces.space`` (points) and ``spaces.loader`` (files) both use it without
importing each other.
"""

from __future__ import annotations

import types
import typing
from functools import lru_cache
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from spaces.schema import fmt_value


@lru_cache(maxsize=None)
def _field_adapter(name: str) -> TypeAdapter:
    from oscqat.config import TrainConfig

    info = TrainConfig.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info])


def field_types(name: str) -> set[type]:
    """Python types a TrainConfig field holds (Optional stripped; Literal -> its values' types)."""
    from oscqat.config import TrainConfig

    annotation = TrainConfig.model_fields[name].annotation
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if is_union else (annotation,)
    found: set[type] = set()
    for arg in args:
        if arg is type(None):
            continue
        if typing.get_origin(arg) is typing.Literal:
            found |= {type(v) for v in typing.get_args(arg)}
        else:
            found.add(arg)
    return found


def coerce_value(field_name: str, value: Any) -> Any:
    """Validate ``value`` as TrainConfig's ``field_name`` would (type and bounds); return it coerced."""
    try:
        return _field_adapter(field_name).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{fmt_value(value)} is not valid for TrainConfig.{field_name} "
                         f"({err['msg'].removeprefix('Value error, ')})") from None
