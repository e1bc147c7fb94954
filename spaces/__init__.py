"""Search spaces per architecture x bit-width: YAML files plus a small loader/validator.

``load_space("mobilenet_v2", "w3a3")`` returns a ``ResolvedSpace`` whose ``define_by_run`` is the
Optuna define-by-run callable Ray Tune's ``OptunaSearch(space=...)`` takes, and whose
``starting_points`` (paper recipes and a plain-LSQ baseline) go to ``points_to_evaluate``.
Layering: imports ``oscqat`` (for TrainConfig) and, lazily, nothing else; optuna only sees duck-typed trials.
"""

from spaces.errors import SpaceError
from spaces.loader import (SHIPPED_DIR, SpaceFile, available_bits, coerce_value, list_spaces, load_space,
                           load_space_file, space_path)
from spaces.schema import CategoricalParam, FixedParam, FloatParam, IntParam
from spaces.space import ResolvedSpace, is_active

__all__ = [
    "SHIPPED_DIR", "CategoricalParam", "FixedParam", "FloatParam", "IntParam", "ResolvedSpace", "SpaceError",
    "SpaceFile", "available_bits", "coerce_value", "is_active", "list_spaces", "load_space", "load_space_file",
    "space_path",
]
