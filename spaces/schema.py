"""Pydantic models of a search-space file: parameter specs and the file layout.

The models check what a spec means on its own (low < high, log needs low > 0, known keys);
``spaces.loader`` checks what needs the whole file (TrainConfig fields, conditions, starting points).
Every model forbids unknown keys, so a typo (``lo:``, ``choice:``) is an error, not a silent default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = Union[bool, int, float, str, None]
KINDS = ("float", "int", "categorical", "fixed")


def fmt_value(value: Any) -> str:
    """Short, unambiguous rendering of a value in messages and tables."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if isinstance(value, str) else repr(value)


class _Param(BaseModel):
    """Fields every kind shares: an optional condition and a note for humans."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: dict[str, list[Scalar]] = Field(
        default_factory=dict,
        description="Sample only when every named (earlier) parameter has one of the listed values.")
    help: str = ""

    @field_validator("when", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        """Accept ``when: {method: freeze}`` as shorthand for ``[freeze]``."""
        if isinstance(value, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in value.items()}
        return value

    @field_validator("when")
    @classmethod
    def _nonempty(cls, value: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for parent, allowed in value.items():
            if not allowed:
                raise ValueError(f"condition on {parent!r} lists no values")
        return value

    @property
    def sampled(self) -> bool:
        """True where Optuna suggests the value; False for fixed parameters."""
        return True

    def condition_text(self) -> str:
        return " and ".join(
            f"{p} in {{{', '.join(fmt_value(v) for v in allowed)}}}" for p, allowed in self.when.items())


class FloatParam(_Param):
    """``trial.suggest_float(name, low, high, log=..., step=...)``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "FloatParam":
        _check_range(self.low, self.high, self.log)
        if self.step is not None:
            if self.log:
                raise ValueError("step cannot be combined with log: true")
            n = (self.high - self.low) / self.step
            if not math.isclose(n, round(n), rel_tol=1e-9, abs_tol=1e-9):
                raise ValueError(f"high - low ({fmt_value(self.high - self.low)}) is not a multiple of step ({fmt_value(self.step)})")
        return self

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a point of this range, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if not self.low <= value <= self.high:
            return f"{fmt_value(value)} is outside [{fmt_value(self.low)}, {fmt_value(self.high)}]"
        if self.step is not None:
            n = (value - self.low) / self.step
            if not math.isclose(n, round(n), rel_tol=1e-9, abs_tol=1e-9):
                return f"{fmt_value(value)} is not on the grid low + k * {fmt_value(self.step)}"
        return None

    def describe(self) -> str:
        extra = ", log" if self.log else (f", step {fmt_value(self.step)}" if self.step else "")
        return f"{fmt_value(self.low)} .. {fmt_value(self.high)}{extra}"


class IntParam(_Param):
    """``trial.suggest_int(name, low, high, step=..., log=...)``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "IntParam":
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step cannot be combined with log: true")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high - self.low}) is not a multiple of step ({self.step})")
        return self

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
        if not self.low <= value <= self.high:
            return f"{value} is outside [{self.low}, {self.high}]"
        if (value - self.low) % self.step:
            return f"{value} is not on the grid low + k * {self.step}"
        return None

    def describe(self) -> str:
        extra = ", log" if self.log else (f", step {self.step}" if self.step != 1 else "")
        return f"{self.low} .. {self.high}{extra}"


class CategoricalParam(_Param):
    """``trial.suggest_categorical(name, choices)``."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _unique(cls, value: list[Scalar]) -> list[Scalar]:
        seen: list[Scalar] = []
        for choice in value:
            if any(type(choice) is type(s) and choice == s for s in seen):
                raise ValueError(f"choice {fmt_value(choice)} is listed twice")
            seen.append(choice)
        return value

    def suggest(self, trial: Any, name: str) -> Scalar:
        return trial.suggest_categorical(name, list(self.choices))

    def problem(self, value: Any) -> str | None:
        if value not in self.choices:
            return f"{fmt_value(value)} is not one of {', '.join(fmt_value(c) for c in self.choices)}"
        return None

    def describe(self) -> str:
        return " | ".join(fmt_value(c) for c in self.choices)


class FixedParam(_Param):
    """A constant: not suggested, returned by ``define_by_run`` for the caller to merge in."""

    type: Literal["fixed"]
    value: Scalar

    @property
    def sampled(self) -> bool:
        return False

    def problem(self, value: Any) -> str | None:
        if value != self.value:
            return f"{fmt_value(value)} differs from the fixed value {fmt_value(self.value)}"
        return None

    def describe(self) -> str:
        return f"= {fmt_value(self.value)}"


def _check_range(low: float, high: float, log: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({fmt_value(low)}) must be less than high ({fmt_value(high)}); "
                         "use type: fixed for a constant")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got low = {fmt_value(low)}")


ParamSpec = Annotated[Union[FloatParam, IntParam, CategoricalParam, FixedParam], Field(discriminator="type")]
AnyParam = Union[FloatParam, IntParam, CategoricalParam, FixedParam]


class BitsSection(BaseModel):
    """One bit-width: overrides of the base parameters, and named starting points.

    ``params`` entries without ``type`` are merged key by key into the base spec (e.g. only
    ``low``/``high``); an entry with ``type`` replaces it; ``null`` removes the parameter.
    """

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(default_factory=dict)  # specs are checked by the loader
    starting_points: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("params", "starting_points", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any, info) -> Any:
        if value is None:
            return {} if info.field_name == "params" else []
        return value


class SpaceFileModel(BaseModel):
    """Top level of a space file: a base space plus one section per bit-width."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1)
    arch: str | None = Field(default=None, min_length=1)
    description: str = ""
    params: dict[str, Any] = Field(min_length=1)  # specs are checked by the loader
    bits: dict[str, BitsSection | None] = Field(min_length=1)
