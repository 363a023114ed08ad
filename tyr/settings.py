"""Typed settings from plain mappings: the one conversion of a config node (a dict, as Hydra composed
it) to a settings dataclass. Fields are converted by their annotations (numbers, strings, lists,
tuples, nested dataclasses, ``X | None``); a missing key takes the dataclass's default (the one
place it is written: a dataclass default, or the YAML option when the field has none); an unknown
key is an error naming it. Torch-free."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class UnknownSettingError(ValueError):
    """A config node holds a key its settings dataclass does not know."""


def from_config(cls: type[T], options: Mapping[str, Any], where: str = "") -> T:
    """``cls(**options)`` with every value converted to its field's type; ``where`` names the node in
    errors (``"search"``, ``"recover.lora"``)."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnknownSettingError(f"unknown {where or cls.__name__} settings {unknown}; known: {known}")
    missing = [f.name for f in fields(cls) if f.name not in options and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UnknownSettingError(f"{where or cls.__name__}: missing settings {missing}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in options.items()})


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if is_dataclass(tp):
        return value if isinstance(value, tp) else from_config(tp, value, where)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: {list(value)} must have {len(args)} entries")
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is list or tp is list:
        return [_convert(args[0], v, where) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        return dict(value)
    if tp in (int, float, str, bool):
        if tp is not str and isinstance(value, str):
            raise ValueError(f"{where}={value!r} is not a {tp.__name__}")
        return tp(value)
    return value
