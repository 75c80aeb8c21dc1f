"""Typed-config machinery: dicts -> nested dataclasses, ``key.sub=value`` overrides, field docs.

Config classes are plain ``@dataclass``es with a string literal under each field (its
docstring) and a short ``__post_init__`` that validates that class alone. This module turns
YAML-shaped dicts into those classes, strictly: an unknown key is a ``ConfigError`` naming
the closest valid key, a value of the wrong type is refused with the field's doc.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar, Union

import yaml

from megatron_rl.errors import ConfigError

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the string literal written under it in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # defined in a REPL: no source
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def closest(name: str, choices: list[str]) -> str:
    """' (did you mean `x`?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, doc: str) -> Any:
    """Check ``value`` against annotation ``tp``; returns it, converted where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, doc)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"`{path}` cannot be null.")
    if origin is Literal:
        if value in args:
            return value
        names = [str(a) for a in args]
        raise ConfigError(
            f"`{path}` is {value!r}, which is not one of {names}"
            f"{closest(str(value), names)}. {doc}".strip()
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"`{path}` must be a mapping of {tp.__name__} fields, got {value!r}.")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{path}` must be a list, got {value!r}. {doc}".strip())
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]", doc) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{path}` must be a mapping, got {value!r}. {doc}".strip())
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-6` (no dot) is a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"`{path}` must be of type {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__}). {doc}".strip()
        )
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (YAML-shaped) dict, recursively and strictly."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    docs = field_docs(cls)
    kwargs: dict[str, Any] = {}
    for key, value in (data or {}).items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(
                f"Unknown config key `{full}`{closest(str(key), list(fields))}. "
                f"Valid keys here: {', '.join(sorted(fields))}."
            )
        kwargs[key] = _coerce(value, hints[key], full, docs.get(key, ""))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if path and not str(e).startswith(f"`{path}"):
            raise ConfigError(f"In `{path}`: {e}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (YAML-serialisable)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_override(tree: dict[str, Any], cls: type, override: str) -> None:
    """Apply one ``a.b.c=value`` to a raw config dict, checking the key path against ``cls``.

    The value is parsed as a YAML scalar/flow value (``3``, ``1e-6``, ``true``, ``null``,
    ``[1,2]``), so types follow YAML's rules; ``from_dict`` checks them afterwards.
    """
    if "=" not in override:
        raise ConfigError(
            f"Override `{override}` has no `=`: write overrides as `section.key=value`, "
            "e.g. `parallel.tp=2`."
        )
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node, klass, walked = tree, cls, []
    for i, key in enumerate(keys):
        walked.append(key)
        names = [f.name for f in dataclasses.fields(klass)]
        if key not in names:
            raise ConfigError(
                f"Unknown config key `{'.'.join(walked)}` in override `{override}`"
                f"{closest(key, names)}. Valid keys here: {', '.join(sorted(names))}."
            )
        tp = typing.get_type_hints(klass)[key]
        if i == len(keys) - 1:
            try:
                node[key] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"Cannot parse the value in override `{override}`: {e}") from None
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(
                f"`{'.'.join(walked)}` is a value, not a section, so `{dotted}` does not exist."
            )
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node, klass = child, tp


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ``ConfigError(message)`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)
