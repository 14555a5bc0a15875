"""Typed configs: frozen dataclasses filled from YAML/JSON files, dicts and `key=value` overrides.

Every component declares the fields it reads in a small `Config` dataclass next to its code; a trainer's config
is the union of those (multiple inheritance), so upstream's flat YAML files load unchanged. Loading checks types,
rejects unknown keys by name, and reports every missing required key at once.
"""
import copy
import dataclasses
import difflib
import json
import types
import typing
import warnings
from typing import Any, ClassVar, Iterable, Mapping, Optional, Union

import yaml

EXPECTED = "___REQUIRED___"  # default of a field that must always be set
EXPECTED_TRAIN = "___REQUIRED_TRAIN___"  # default of a field that must be set when training


class ConfigError(ValueError):
    """A config that cannot be used: unknown, missing or mistyped keys."""


class ConfigWarning(UserWarning):
    """A config key that was accepted but changed or ignored (upstream compatibility)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of all configs. Subclasses add fields; the class tables below keep upstream's files loading.

    RENAMED: old key path -> new key path, accepted with a warning (paths may reach into dict fields: 'a.b').
    IGNORED: key -> reason; accepted, dropped, warned.
    REPLACED: key -> hint; rejected with an error that points to the key to use instead.
    Each table is merged over the class hierarchy, so mixins contribute their own entries.
    """

    training: bool = True

    RENAMED: ClassVar[Mapping[str, str]] = {}
    IGNORED: ClassVar[Mapping[str, str]] = {}
    REPLACED: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self):
        """Cross-field checks; mixins extend it (calling super) and raise ConfigError."""

    @classmethod
    def _table(cls, name: str) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get(name, {}))
        return merged

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], training: bool = True, overrides: Iterable[str] = ()):
        """Builds the config from `values` plus `key=value` overrides (values parsed as YAML)."""
        values = copy.deepcopy(dict(values or {}))
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not of the form key=value")
            _set_path(values, key.strip(), yaml.safe_load(raw))
        values.pop("training", None)

        for old, new in cls._table("RENAMED").items():
            found, value = _pop_path(values, old)
            if found:
                warnings.warn(f"config key '{old}' is read as '{new}'", ConfigWarning, stacklevel=2)
                _set_path(values, new, value)
        for key, reason in cls._table("IGNORED").items():
            if key in values:
                values.pop(key)
                warnings.warn(f"config key '{key}' is ignored: {reason}", ConfigWarning, stacklevel=2)

        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "training"}
        unknown = [k for k in values if k not in fields]
        if unknown:
            replaced = cls._table("REPLACED")
            lines = []
            for key in unknown:
                hint = replaced.get(key)
                if hint is None:
                    close = difflib.get_close_matches(key, fields, n=1)
                    hint = f"did you mean '{close[0]}'?" if close else "no such setting"
                lines.append(f"'{key}': {hint}")
            raise ConfigError(f"unknown config key(s) for {cls.__qualname__}: " + "; ".join(lines))

        missing = [
            name for name, f in fields.items()
            if name not in values and (f.default == EXPECTED or (f.default == EXPECTED_TRAIN and training))
        ]
        if missing:
            raise ConfigError(f"missing required config key(s) for {cls.__qualname__}: " + ", ".join(missing))

        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            f = fields[name]
            nullable = f.default is None
            kwargs[name] = _coerce(value, hints[name], name, nullable)
        return cls(training=training, **kwargs)

    @classmethod
    def load(cls, path: Optional[str] = None, values: Optional[Mapping] = None, overrides: Iterable[str] = (),
             training: bool = True):
        """Reads a .yaml/.yml/.json file (or takes `values`), then applies `key=value` overrides."""
        if path is not None:
            with open(path, "r", encoding="utf-8") as file:
                if path.endswith((".yaml", ".yml")):
                    values = yaml.safe_load(file) or {}
                elif path.endswith(".json"):
                    values = json.load(file)
                else:
                    raise ConfigError(f"config file must be .yaml, .yml or .json: {path}")
        return cls.from_dict(values or {}, training=training, overrides=overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _set_path(values: dict, path: str, value):
    *parents, leaf = path.split(".")
    for part in parents:
        values = values.setdefault(part, {})
        if not isinstance(values, dict):
            raise ConfigError(f"cannot set '{path}': '{part}' is not a mapping")
    values[leaf] = value


def _pop_path(values: dict, path: str):
    *parents, leaf = path.split(".")
    for part in parents:
        values = values.get(part)
        if not isinstance(values, dict):
            return False, None
    if leaf not in values:
        return False, None
    return True, values.pop(leaf)


def _coerce(value, tp, name: str, nullable: bool = False):
    """Checks `value` against the annotation `tp`, converting where YAML is ambiguous (`1e-4` is a str in YAML 1.1)."""
    if value in (EXPECTED, EXPECTED_TRAIN):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if nullable or tp is Any or type(None) in args:
            return None
        raise ConfigError(f"config key '{name}' must not be null")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{name}': {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{name}' must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return {k: _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()} if args else dict(value)
    else:
        raise TypeError(f"config field '{name}' has an unsupported annotation {tp}")
    raise ConfigError(f"config key '{name}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
