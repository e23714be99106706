"""Typed run configs: component dataclasses, YAML files, ``key=value`` overrides, resolved dumps.

Hand-written rather than OmegaConf because users should get one error that
names the file, the line, the key and the closest valid key ("did you mean"),
and the dataclasses stay plain (their ``__post_init__`` validates values).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem, located: file and line or override, key, expectation."""


#################################################################################
#                                    Loading                                    #
#################################################################################

def load_config(cls, path: str | None = None, overrides: typing.Sequence[str] = ()):
    """Build ``cls`` from an optional YAML file, then ``key=value`` overrides (later wins)."""
    data: dict = {}
    origin: dict[str, str] = {}  # dotted key -> "file line N" or "override 'k=v'"
    if path is not None:
        data, origin = _read_yaml(path)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value, f"override '{item}'")
        origin[key] = f"override '{item}'"
    return _build(cls, data, prefix="", origin=origin, default_src=path or "<defaults>")


def config_from_dict(cls, data: dict, overrides: typing.Sequence[str] = ()):
    """Rebuild a config from ``to_dict``'s output (e.g. in a spawned process), then ``key=value`` overrides."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    return load_config(cls, None, [f"{k}={json.dumps(v)}" for k, v in flat(data).items()] + list(overrides))


def dump_config(cfg, path: str) -> None:
    """Write the resolved config as YAML (the file a run can be reproduced from)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=None)


def to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def config_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(t):
            keys += config_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


#################################################################################
#                                   Internals                                   #
#################################################################################

class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also records the line of every mapping key."""


def _read_yaml(path: str):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    origin: dict[str, str] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                origin[key] = f"{path} line {k.start_mark.line + 1}"
                walk(v, key + ".")

    walk(node, "")
    return data, origin


def _parse_override(item: str):
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}': expected key=value (e.g. attention.top_k=8)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value, src: str):
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{src}: '{p}' is a value, not a section, so '{key}' cannot be set")
        cur = nxt
    cur[parts[-1]] = value


def _build(cls, data, prefix: str, origin: dict, default_src: str):
    def where(key):  # a section's own line, else where one of its keys was set (e.g. an override of a sub-key)
        return origin.get(key) or next((v for k, v in origin.items() if k.startswith(key + ".")), default_src)
    if not isinstance(data, dict):
        raise ConfigError(f"{where(prefix.rstrip('.'))}: '{prefix.rstrip('.')}' is a section, expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise ConfigError(f"{where(key)}: unknown key '{key}'{_suggest(cls, prefix, str(name))}")
        t = hints[name]
        inner = _unwrap_optional(t)
        if dataclasses.is_dataclass(inner) and value is not None:
            kwargs[name] = _build(inner, value, key + ".", origin, default_src)
        else:
            kwargs[name] = _coerce(t, value, key, where(key))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        bad = next((n for n in fields if msg.startswith(f"{n}:")), None)
        key = prefix + bad if bad else prefix.rstrip(".")
        raise ConfigError(f"{where(key)}: {prefix}{msg}") from None


def _unwrap_optional(t):
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _coerce(t, value, key: str, src: str):
    def fail(expected):
        raise ConfigError(f"{src}: key '{key}' expects {expected}, got {value!r} ({type(value).__name__})")

    origin = get_origin(t)
    if t is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, src)
            except ConfigError:
                pass
        fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in get_args(t):
            fail(f"one of {list(get_args(t))}")
        return value
    if origin in (list, tuple):
        args = get_args(t)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            fail(f"a list of {_type_name(args[0]) if args else 'values'}")
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{key}[{i}]", src) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if t is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail("an integer")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):               # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail("a string")
    if t is dict or origin is dict:
        if isinstance(value, dict):
            return value
        fail("a mapping")
    return value


def _type_name(t):
    return getattr(t, "__name__", str(t))


def _suggest(cls, prefix: str, name: str) -> str:
    """' (did you mean 'x.y'?)' from keys at the same level, else any leaf with a close name."""
    level = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, level, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    root = _ROOTS.get(cls)
    leaves = config_keys(root) if root is not None else []
    by_leaf = [k for k in leaves if difflib.get_close_matches(name, [k.rsplit('.', 1)[-1]], n=1, cutoff=0.8)]
    if by_leaf:
        return f" (did you mean '{by_leaf[0]}'?)"
    return f"; valid keys here: {', '.join(prefix + n for n in level)}"


_ROOTS: dict = {}


def register_root(cls):
    """Mark ``cls`` as a top-level run config, so suggestions can search all of its keys."""
    def mark(c):
        _ROOTS[c] = cls
        hints = get_type_hints(c)
        for f in dataclasses.fields(c):
            t = _unwrap_optional(hints[f.name])
            if dataclasses.is_dataclass(t):
                mark(t)
    mark(cls)
    return cls
