"""Typed settings: each dataclass field declares its type, range and choices once; ``parse_params`` checks them.

One parser for the run config, every metric's ``score.params``, every selector's ``select.params`` and the teacher.
A wrong value fails before any stage runs, in one line naming the key: a bool is not an int, a string is not a
bool, a float with a fraction is not an int, inf and NaN are refused where a finite number is meant, and YAML 1.1
number spellings that YAML reads as strings (``1e-2``) are read as numbers.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections import abc
from typing import Any, Mapping

from .errors import ConfigError

MAX_INT = 2 ** 31 - 1  # faiss and torch take counts and seeds as C ints
NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # what YAML 1.1 leaves as a string


def setting(default: Any = dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, lt=None,
            default_factory: Any = dataclasses.MISSING, finite: bool = True) -> Any:
    """A dataclass field with its accepted values: ``choices``, or a range (``ge``/``gt``/``le``/``lt``);
    ``finite=False`` lets a float be inf."""
    meta = {k: v for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta["finite"] = finite
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def show(value: Any) -> str:
    """A value for an error message: its repr, at most 200 characters (recursive and huge values too)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = 200
    short.maxlevel = 4
    text = short.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def fail(key: str, what: str) -> ConfigError:
    return ConfigError(f"config key {show(key)[:200]}: {what}")


def _number(value: Any, key: str) -> float | int:
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value) if re.search(r"[.eE]", value) else int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(key, f"expected a number, got {show(value)}")
    return value


def coerce(value: Any, tp: Any, key: str, finite: bool = True) -> Any:
    """``value`` checked against the annotation ``tp`` (lists become tuples); a ConfigError names ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key, finite)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail(key, f"expected a list, got {show(value)}")
        return tuple(coerce(v, args[0], key, finite) for v in value) if args else tuple(value)
    if origin in (Mapping, abc.Mapping, dict) or tp in (Mapping, dict):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail(key, f"expected a mapping, got {show(value)}")
        inner = args[1] if len(args) == 2 else Any
        for name, item in value.items():
            if typing.get_origin(inner) in (Mapping, abc.Mapping) and not isinstance(item, Mapping):
                raise fail(f"{key}.{name}", f"expected a mapping of parameters, got {show(item)}")
        return plain(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(key, f"expected true or false, got {show(value)}")
        return value
    if tp is int:
        number = value if isinstance(value, (bool, int, float)) else None
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            number = _number(value, key)
        if number is None or isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
            raise fail(key, f"expected an integer, got {show(value)}")
        return int(number)
    if tp is float:
        number = _number(value, key)
        try:
            number = float(number)
        except OverflowError:
            raise fail(key, f"{show(value)} is too large") from None
        if math.isnan(number) or (finite and math.isinf(number)):
            raise fail(key, f"expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise fail(key, f"expected a string, got {show(value)}")
        return value
    return value


def plain(value: Any, key: str) -> Any:
    """A detached copy of YAML data (mappings, lists, strings, finite numbers, booleans, None); anything else, and
    inf or NaN, fails naming the key it sits under. Typed checks come when a metric or selector parses it."""
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, key) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(key, f"expected a finite number, got {show(value)}")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise fail(key, f"not plain data: {type(value).__name__}")


def check_value(value: Any, meta: Mapping, key: str) -> None:
    """``value`` (each element of a tuple) against a field's ``choices`` and range (None passes: optional)."""
    if value is None:
        return
    if isinstance(value, tuple):
        for item in value:
            check_value(item, meta, key)
        return
    if "choices" in meta and value not in meta["choices"]:
        raise fail(key, f"expected one of {list(meta['choices'])}, got {show(value)}")
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    low = (ge is None or value >= ge) and (gt is None or value > gt)
    high = (le is None or value <= le) and (lt is None or value < lt)
    if low and high:
        return
    ge, gt, le, lt = (_num(v) for v in (ge, gt, le, lt))
    lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    hi = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if lo and hi:
        raise fail(key, f"must be in {lo}, {hi}, got {show(value)}")
    raise fail(key, f"must be {'>=' if ge is not None else '>'} {ge if ge is not None else gt}, got {show(value)}"
               if lo else f"must be {'<=' if le is not None else '<'} {le if le is not None else lt}, got {show(value)}")


def _num(v):
    """A bound as people write it: 1 rather than 1.0."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else v


def parse_params(cls: type, raw: Any, where: str, keys: Mapping[str, str] | None = None) -> Any:
    """``cls(**raw)`` with every value checked: unknown keys, wrong types and values outside a field's choices or
    range fail as a ConfigError naming ``where.<name>`` (or ``keys[name]``). Nested dataclass fields are parsed
    the same way. The instance's ``check()``, if any, then checks rules across its fields."""
    if not isinstance(raw, Mapping):
        raise fail(where or "<root>", f"expected a mapping, got {show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    key = (lambda name: (keys or {}).get(name) or (f"{where}.{name}" if where else str(name)))
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {show(key(unknown[0]))}; known keys: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        tp, meta = hints[name], fields[name].metadata
        if dataclasses.is_dataclass(tp):
            values[name] = parse_params(tp, value, key(name))
        else:
            values[name] = coerce(value, tp, key(name), meta.get("finite", True))
            check_value(values[name], meta, key(name))
    try:
        params = cls(**values)
    except TypeError as exc:  # a field without a default left out
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def check_fields(obj: Any, where: str) -> None:
    """Check (and normalise, e.g. lists to tuples) every field of a dataclass built directly, as
    ``parse_params`` would: for a ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{where}.{f.name}"
        value = coerce(getattr(obj, f.name), hints[f.name], key, f.metadata.get("finite", True))
        check_value(value, f.metadata, key)
        object.__setattr__(obj, f.name, value)
