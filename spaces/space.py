"""A search space resolved for one bit-width: what a search campaign actually samples from.

``define_by_run`` is written for Optuna's define-by-run API and has exactly the shape Ray Tune's
``OptunaSearch(space=callable)`` wants: it calls ``trial.suggest_*`` for every active sampled
parameter, in file order (so a condition always sees its parent's value), and returns the active
*fixed* parameters as a dict for the caller to merge into the trial config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spaces.errors import SpaceError
from spaces.fields import coerce_value
from spaces.schema import AnyParam


def is_active(spec: AnyParam, values: dict[str, Any]) -> bool:
    """A parameter is active when every parent it names is present with an allowed value.

    A parent that is itself inactive is absent from ``values``, so its children are inactive too.
    """
    return all(parent in values and values[parent] in allowed for parent, allowed in spec.when.items())


@dataclass(frozen=True)
class ResolvedSpace:
    """One (space, bit-width): ordered parameter specs and the starting points to enqueue first."""

    name: str
    bits: str
    params: dict[str, AnyParam]
    arch: str | None = None
    source: str = ""
    description: str = ""
    starting_point_names: list[str] = field(default_factory=list)
    _points: list[dict[str, Any]] = field(default_factory=list, repr=False)

    # sampling -----------------------------------------------------------------
    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Suggest every active sampled parameter on ``trial``; return the active fixed ones."""
        return {k: v for k, v in self._walk(trial).items() if not self.params[k].sampled}

    def sample(self, trial: Any) -> dict[str, Any]:
        """Like ``define_by_run`` but returns every active parameter (sampled and fixed)."""
        return self._walk(trial)

    def _walk(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, spec in self.params.items():
            if not is_active(spec, values):
                continue
            values[name] = spec.suggest(trial, name) if spec.sampled else spec.value
        return values

    # starting points -------------------------------------------------------------
    @property
    def starting_points(self) -> list[dict[str, Any]]:
        """Full parameter dicts (sampled and fixed, no ``name``), in file order.

        Suitable for ``OptunaSearch(points_to_evaluate=...)``: Optuna uses the enqueued value of
        every parameter the trial suggests and ignores the fixed ones.
        """
        return [dict(p) for p in self._points]

    def starting_point(self, name: str) -> dict[str, Any]:
        """The starting point called ``name``."""
        try:
            return dict(self._points[self.starting_point_names.index(name)])
        except ValueError:
            raise SpaceError(f"{self.source}: bits {self.bits}: no starting point {name!r}; "
                             f"have {', '.join(self.starting_point_names) or 'none'}") from None

    def check_point(self, point: dict[str, Any], label: str = "point") -> dict[str, Any]:
        """Validate a parameter dict against this space; return it with the fixed values filled in.

        Every active sampled parameter must be given and lie in its range; inactive or unknown
        parameters are refused (they would be silently ignored by Optuna). Values are coerced to
        the TrainConfig field type first, so ``"1e-5"`` (how YAML 1.1 reads 1e-5) is accepted.
        """
        where = f"{self.source}: bits {self.bits}: {label}"
        unknown = [k for k in point if k not in self.params]
        if unknown:
            raise SpaceError(f"{where}: unknown parameter {unknown[0]!r}; "
                             f"the space has {', '.join(self.params)}")
        values: dict[str, Any] = {}
        for name, spec in self.params.items():
            if not is_active(spec, values):
                if name in point:
                    raise SpaceError(f"{where}: parameter {name!r} is inactive here "
                                     f"(it needs {spec.condition_text()}); remove it")
                continue
            if name not in point:
                if spec.sampled:
                    raise SpaceError(f"{where}: parameter {name!r} is missing (it is sampled here)")
                values[name] = spec.value
                continue
            try:
                value = coerce_value(name, point[name])
            except ValueError as exc:
                raise SpaceError(f"{where}: parameter {name!r}: {exc}") from None
            problem = spec.problem(value)
            if problem:
                raise SpaceError(f"{where}: parameter {name!r}: {problem}")
            values[name] = value
        return values

    # configs -------------------------------------------------------------------
    def to_train_config(self, params: dict[str, Any], base: dict[str, Any] | None = None):
        """``TrainConfig`` = ``base`` + ``params`` + this space's bits (and arch, if the file names one).

        Raises SpaceError when ``base`` asks for other bits or another arch than the space, or when
        the merged dict is not a valid TrainConfig.
        """
        from oscqat.config import ConfigError, TrainConfig, parse_bits, validate_config

        data = {**(base or {}), **params}
        where = f"{self.source}: bits {self.bits}"
        if "bits" in data and parse_bits(str(data["bits"])) != parse_bits(self.bits):
            raise SpaceError(f"{where}: config asks for bits {data['bits']!r}, but this space is resolved "
                             f"for {self.bits!r}; load the space for {data['bits']!r}")
        data["bits"] = self.bits
        if self.arch is not None:
            if data.get("arch", self.arch) != self.arch:
                raise SpaceError(f"{where}: config asks for arch {data['arch']!r}, but this space is for "
                                 f"{self.arch!r}; use that arch's space, or drop 'arch:' from the file to "
                                 "make it apply to any arch")
            data["arch"] = self.arch
        try:
            return validate_config(TrainConfig, data, source=f"{self.source} ({self.bits})")
        except ConfigError as exc:
            raise SpaceError(str(exc)) from None

    # presentation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used by ``oscqat spaces show --json``)."""
        return {
            "space": self.name, "bits": self.bits, "arch": self.arch, "source": self.source,
            "description": self.description,
            "params": {k: {"type": v.type, **v.model_dump(exclude_defaults=True)} for k, v in self.params.items()},
            "starting_points": [{"name": n, "params": dict(p)}
                                for n, p in zip(self.starting_point_names, self._points)],
        }

    def __str__(self) -> str:
        lines = [f"space {self.name} ({self.bits}) from {self.source}"]
        for name, spec in self.params.items():
            cond = f"  [when {spec.condition_text()}]" if spec.when else ""
            lines.append(f"  {name}: {spec.type} {spec.describe()}{cond}")
        return "\n".join(lines)


__all__ = ["ResolvedSpace", "is_active"]
