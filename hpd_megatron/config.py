"""Plain YAML/dicts mapped onto typed dataclasses, with errors that name the key.

Every config object in the project is a dataclass; ``from_dict`` fills one from a
mapping, recursing into nested dataclasses, and rejects unknown keys and values of
the wrong type with the dotted path of the offending key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hpd_megatron.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the type ``annotation`` says, or a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(annotation), where)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value in allowed:
            return value
        choices = ", ".join(str(choice) for choice in allowed)
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or annotation in (list, tuple):
        return _coerce_sequence(value, annotation, where)
    if annotation in _SCALARS:
        return _SCALARS[annotation](value, where)
    return value


def _coerce_union(value: Any, options: tuple, where: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(value, option, where)
        except ConfigError as error:
            errors.append(str(error))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{where}: {value!r} fits none of {' | '.join(map(str, options))}")


def _coerce_sequence(value: Any, annotation: Any, where: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(annotation)
    item_type = args[0] if args else Any
    items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if (typing.get_origin(annotation) or annotation) is tuple else items


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        # What ${NAME:-100} expands to: the environment only holds strings.
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _as_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_INTEGER = re.compile(r"[+-]?[0-9]+")
_SCALARS = {
    Any: lambda value, _where: value,
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
}


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes key names in errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last,
    silently dropping the first value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file (and line, for syntax errors and duplicate keys)
    on failure."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})"
        ) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return dict(data)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SECRET_VARIABLE = re.compile(r"TOKEN|PASSWORD|SECRET|KEY", re.IGNORECASE)
"""Variable names whose values are masked in everything logged or saved."""
_EXPANDED_SECRETS: set[str] = set()
_KEPT_UNSET: ContextVar[list[str] | None] = ContextVar("kept_unset_variables", default=None)


def expanded_secrets() -> frozenset[str]:
    """The values this process expanded from secret-named variables (for redaction)."""
    return frozenset(_EXPANDED_SECRETS)


@contextmanager
def unset_variables_kept() -> Iterator[list[str]]:
    """Inside this block an unset ``${NAME}`` stays as written instead of failing.

    Yields the list of such names (each once, in order of appearance). Only the planner
    uses it: sizing a layout reads no path, so it must work where the site's paths are not
    exported; ``--check-inputs`` and training expand strictly.
    """
    kept: list[str] = []
    token = _KEPT_UNSET.set(kept)
    try:
        yield kept
    finally:
        _KEPT_UNSET.reset(token)


def expand_variables(data: Any, source: str | Path, where: str = "") -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string value with the environment's.

    Recipes name site-specific paths (converted checkpoints, data) this way instead of
    hard-coding them; an unset variable without a default is an error naming ``source``,
    the dotted key and the variable, so a missing export fails before any GPU is touched
    (except inside ``unset_variables_kept``).
    """
    if isinstance(data, Mapping):
        return {
            key: expand_variables(value, source, f"{where}.{key}" if where else str(key))
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [expand_variables(item, source, f"{where}[{i}]") for i, item in enumerate(data)]
    if not isinstance(data, str):
        return data

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name, default)
        if value is not None:
            if value and SECRET_VARIABLE.search(name):
                _EXPANDED_SECRETS.add(value)
            return value
        kept = _KEPT_UNSET.get()
        if kept is None:
            raise ConfigError(
                f"{source}: {where}: environment variable {name} is not set "
                f"(export it or write ${{{name}:-default}})"
            )
        if name not in kept:
            kept.append(name)
        return match.group(0)

    return _VARIABLE.sub(substitute, data)
