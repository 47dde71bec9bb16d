"""Plain dataclass settings: defined once, beside the code that reads them, importable with the standard library.

The training settings live as frozen dataclasses in ``geojepa.model.sizes`` (``ModelSizes``) and
``geojepa.train.settings`` (``TrainSettings``, ``MaskConfig``), so a bare GPU host (torch, numpy and pyarrow;
no pydantic) can build them from the launcher's JSON. A field's bounds sit in its metadata
(``epochs: int = setting(300, gt=0)``); the dataclass checks them in ``__post_init__`` (``check``: a ValueError
naming the field), and ``geojepa.config`` turns the same fields (types, defaults, bounds) into its pydantic
sections, so a config file or ``--set`` override is validated, and an unknown key named, when it is loaded.
``from_dict`` builds a dataclass from JSON data: lists become tuples where the type is a tuple, a nested
dataclass is built from its mapping, an unknown key is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_BOUNDS = {"gt": (operator.gt, "greater than"), "ge": (operator.ge, "greater than or equal to"),
           "lt": (operator.lt, "less than"), "le": (operator.le, "less than or equal to")}


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, gt: float | None = None,
            ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a default (or a ``factory`` for one) and optional bounds (None passes them)."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return dataclasses.field(default=default, default_factory=factory, metadata={"bounds": bounds} if bounds else {})


def bounds(f: dataclasses.Field) -> dict[str, float]:
    """A field's bounds: ``{"gt": 0}`` and the like (the keyword arguments of pydantic's ``Field``)."""
    return dict(f.metadata.get("bounds", {}))


def check(obj: Any) -> None:
    """Raise ValueError naming the first field of the dataclass ``obj`` outside its bounds."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for key, bound in bounds(f).items():
            op, words = _BOUNDS[key]
            if value is not None and not op(value, bound):
                raise ValueError(f"{f.name}={value!r}: should be {words} {bound}")


def _is_tuple(hint: Any) -> bool:
    return any(typing.get_origin(h) is tuple for h in (hint, *typing.get_args(hint)))


def _dataclass_in(hint: Any) -> type | None:
    return next((h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)), None)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """The dataclass ``cls`` from a mapping of its fields (JSON data); a key it lacks is a ValueError naming it."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"unknown {cls.__name__} setting(s) {', '.join(map(repr, unknown))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(value, Mapping) and (inner := _dataclass_in(hint)) is not None:
            value = from_dict(inner, value)
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass ``obj`` as JSON data (nested dataclasses as mappings, tuples as lists)."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def pick(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``data`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in data.items() if k in names}
