"""A builder's settings against the types its signature declares (`misfit`), so that `model.hidden=abc` is refused
when the config is composed rather than by torch once the run has begun.

What is checked: int, float, bool, str, None, lists and tuples of these, dicts, `Literal` choices and unions of
these (`Optional[int]`, `int | None`). An int is a float; a bool is neither an int nor a float (`hidden=true` is a
mistake, not 1); null fits only a type that allows it, or a setting whose default is null (`x: int = None`).
Whatever else a signature names (a Tensor, a Path, a module, a class of the user's) cannot be told from a config
value and is not checked, and in a union it lets every value through (torch's `lr: float | Tensor`); neither is a
setting without an annotation, a missing value (`???`), an interpolation, or a value that `_target_` builds."""

import inspect
import json
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf


def signature(builder) -> inspect.Signature | None:
    """The builder's signature with its annotations evaluated (`from __future__ import annotations` makes them
    strings), or as written where they cannot be (a name imported for type checkers only); None where there is none
    to read (some builtins)."""
    try:
        return inspect.signature(builder, eval_str=True)
    except (TypeError, ValueError):
        return None
    except Exception:  # an annotation that does not evaluate: the strings are left unchecked
        try:
            return inspect.signature(builder)
        except (TypeError, ValueError):
            return None


def misfit(node: DictConfig, key: str, param: inspect.Parameter) -> tuple[str, str] | None:
    """(the value, as written; the type it should have) when the value of `node[key]` does not fit the annotation
    of `param`; None when it fits or cannot be told."""
    hint = param.annotation
    if hint is param.empty or isinstance(hint, str):
        return None
    if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
        return None
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # an interpolation inside it that resolves only in the run
        return None
    if value is None and param.default is None:
        return None
    return None if fits(value, hint) else (shown(value), named(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (plain: None, bool, int, float, str, list, dict) can be what `hint` declares."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if isinstance(value, dict) and "_target_" in value:  # built by instantiate: its type shows only then
        return True
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    kind = origin or hint
    if not inspect.isclass(kind):  # a TypeVar, a NewType, a Callable's ...: not told from a value
        return True
    if issubclass(kind, (list, tuple, Sequence)) and not issubclass(kind, (str, bytes)):
        if not isinstance(value, list):
            return False
        if issubclass(kind, tuple) and args and args[-1] is not Ellipsis:  # tuple[float, float]: so many, so typed
            return len(value) == len(args) and all(fits(v, arg) for v, arg in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if issubclass(kind, Mapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(fits(v, args[1]) for v in value.values())
    return True


def named(hint: Any) -> str:
    """A type as Python writes it: int, list[float], int | None, Literal['a', 'b']."""
    if inspect.isclass(hint) and not get_args(hint):
        return hint.__name__
    return re.sub(r"\btyping\.", "", repr(hint)).replace("NoneType", "None")


def shown(value: Any) -> str:
    """A config value as it is written on the command line: true, null, [1, 2], abc."""
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return value if isinstance(value, str) else json.dumps(value)
