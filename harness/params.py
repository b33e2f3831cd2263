"""Typed hyper-parameters: check a user's values against a plugin's ``Params`` dataclass."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping, Union

from harness.api import UserError

_MISSING = dataclasses.MISSING


def fields(params_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(params_cls))


def _hints(params_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(params_cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), allows_none
    return hint, False


def type_name(hint: Any) -> str:
    base, optional = _base_type(hint)
    if typing.get_origin(base) is Literal:
        name = " | ".join(str(a) for a in typing.get_args(base))
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def coerce(value: Any, f: dataclasses.Field, hint: Any, where: str) -> Any:
    """``value`` as the field's type, or a UserError that says what is valid."""
    base, optional = _base_type(hint)
    meta = f.metadata or {}
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must be {type_name(hint)}, not null")
    choices = meta.get("choices")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        base = type(choices[0])
    if base is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false, not {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise UserError(f"{where}: must be an integer, not {value!r}")
    elif base is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: must be a number, not {value!r}")
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{where}: must be a number, not {value!r}") from None
        if not isinstance(value, (int, float)):
            raise UserError(f"{where}: must be a number, not {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: must be a string, not {value!r}")
    if choices is not None and value not in choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise UserError(f"{where}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise UserError(f"{where}: {value!r} is above the maximum {high}")
    return value


def unknown_key(name: str, valid: list[str], where: str, what: str = "parameter") -> UserError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"{where}: unknown {what} {name!r}{hint}; valid: {', '.join(valid) or 'none'}")


def check_values(params_cls: type, values: Mapping[str, Any], where: str,
                 grid: bool = False) -> dict[str, Any]:
    """Check user values (a list means a grid of values when ``grid``) and return them typed."""
    hints = _hints(params_cls)
    by_name = {f.name: f for f in fields(params_cls)}
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if name not in by_name:
            raise unknown_key(str(name), list(by_name), where)
        if grid and isinstance(value, list):
            if not value:
                raise UserError(f"{where}.{name}: an empty list gives no runs")
            checked[name] = [coerce(v, by_name[name], hints[name], f"{where}.{name}")
                             for v in value]
        else:
            checked[name] = coerce(value, by_name[name], hints[name], f"{where}.{name}")
    return checked


def resolve(params_cls: type, values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Every field with its value (defaults filled), sorted by name: hashable and stable."""
    out = {}
    for f in fields(params_cls):
        out[f.name] = values[f.name] if f.name in values else default_of(f)
    return tuple(sorted(out.items()))


def build(params_cls: type, resolved: Any) -> Any:
    return params_cls(**dict(resolved))


def describe(params_cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of each field, for ``bench.py list``."""
    hints = _hints(params_cls)
    rows = []
    for f in fields(params_cls):
        meta = f.metadata or {}
        text = meta.get("help", "")
        if meta.get("choices"):
            text += f" [{'|'.join(map(str, meta['choices']))}]"
        bounds = [f"≥{meta['min']}" if meta.get("min") is not None else "",
                  f"≤{meta['max']}" if meta.get("max") is not None else ""]
        if any(bounds):
            text += " (" + ", ".join(b for b in bounds if b) + ")"
        rows.append((f.name, type_name(hints[f.name]), repr(default_of(f)), text.strip()))
    return rows

