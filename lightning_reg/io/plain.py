"""Plain data from files we do not trust: the one check that a value read from a file (checkpoint
hyperparameters, snapshot arguments, JSON headers, what ``meta.json`` will record) is JSON-able data of bounded
size before anything uses it (docs/security.md).

``plain_data(value, field)`` returns a copy made of ``dict`` (string keys), ``list``, ``str``, ``int``, finite
``float``, ``bool`` and ``None`` only (tuples become lists), walking at most ``max_items`` nodes to at most
``max_depth`` levels, with strings of at most ``max_chars`` characters (``MAX_TOTAL_CHARS`` in all). Anything
else (another type, a cycle, a tree that a pickle memo or YAML aliases expand past the budget, an infinite or
NaN float) is one
``ConfigError`` naming ``field`` and the path inside it, found in time and memory bounded by the budget.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from collections.abc import Mapping

from lightning_reg.errors import ConfigError

MAX_ITEMS = 100_000
MAX_DEPTH = 32
MAX_CHARS = 100_000
MAX_TOTAL_CHARS = 10_000_000  # of all strings together: one long string referenced many times stays bounded


def plain_data(value, field: str, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH,
               max_chars: int = MAX_CHARS, finite: bool = True):
    """``value`` as JSON-able plain data within the budget (see the module docstring), or one ConfigError."""
    count = chars = 0

    def refuse(path: str, problem: str) -> ConfigError:
        shown = path if len(path) <= 80 else f"{path[:40]}...{path[-30:]}"
        return ConfigError(f"{field}{shown}: {problem}; refused (files are read as plain data of bounded size)")

    def copy(node, path: str, depth: int, ancestors: tuple[int, ...]):
        nonlocal count, chars
        count += 1
        if count > max_items:
            raise refuse(path, f"holds more than {max_items:,} values (a container repeated through the file's "
                               "references expands past the budget)")
        if depth > max_depth:
            raise refuse(path, f"is nested deeper than {max_depth} levels")
        if node is None or isinstance(node, bool):
            return node
        if isinstance(node, int):
            if abs(node) > 1 << 63:
                raise refuse(path, f"is an integer of {node.bit_length()} bits")
            return int(node)
        if isinstance(node, float):
            if finite and not math.isfinite(node):
                raise refuse(path, f"is {node}, not a finite number")
            return float(node)
        if isinstance(node, str):
            chars += len(node)
            if len(node) > max_chars or chars > MAX_TOTAL_CHARS:
                raise refuse(path, f"is a string of {len(node):,} characters (at most {max_chars:,}, and "
                                   f"{MAX_TOTAL_CHARS:,} in all)")
            return str(node)
        if isinstance(node, (Mapping, list, tuple)):
            if id(node) in ancestors:
                raise refuse(path, "contains itself")
            inner = (*ancestors, id(node))
            if isinstance(node, Mapping):
                out = {}
                for key, item in node.items():
                    if not isinstance(key, str):
                        raise refuse(path, f"has a key {type(key).__name__} {str(key)[:40]!r}, not a string")
                    out[str(key)] = copy(item, f"{path}.{key[:40]}", depth + 1, inner)
                return out
            return [copy(item, f"{path}[{i}]", depth + 1, inner) for i, item in enumerate(node)]
        raise refuse(path, f"is a {type(node).__module__}.{type(node).__name__}, not plain data (dict, list, str, "
                           "number, bool, null)")

    return copy(value, "", 0, ())


def check_arguments(target, arguments, field: str, int_limit: int | None = None, complete: bool = True) -> dict:
    """``arguments`` (read from a file) as keyword arguments of ``target``'s signature, each value checked against
    its annotation (``int``, ``float``, ``bool``, ``str``, ``None``, their unions and sequences; other annotations:
    plain data only); an integer above ``int_limit`` is refused (a network's width or depth cannot exceed its
    number of weights). Names the signature lacks go to its ``**kwargs`` if it has one; ``complete``: every argument
    without a default is given. One ConfigError else."""
    arguments = plain_data(arguments, field)
    if not isinstance(arguments, dict):
        raise ConfigError(f"{field}: is a {type(arguments).__name__}, not a mapping of argument names to values")
    signature = inspect.signature(target)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    params = {n: p for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(arguments) - set(params))
    if unknown and not open_ended:
        raise ConfigError(f"{field}: {target.__name__} takes no argument {unknown[0]!r}; it takes {sorted(params)}")
    missing = [n for n, p in params.items() if complete and p.default is p.empty and n not in arguments]
    if missing:
        raise ConfigError(f"{field}: {target.__name__} needs the argument {missing[0]!r}")
    for name, value in arguments.items():
        if not fits(value, hints.get(name, typing.Any), int_limit):
            hint = hints.get(name)
            wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{field}.{name}: {str(value)[:60]!r} is not a valid {wanted} for {target.__name__}"
                              + (f" (integers at most {int_limit:,} here)" if int_limit is not None else ""))
    return arguments


def fits(value, annotation, int_limit: int | None) -> bool:
    """Whether plain ``value`` is of type ``annotation`` (``check_arguments``); unknown annotations accept it,
    but integers anywhere in it stay below ``int_limit``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a, int_limit) for a in args)
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and (int_limit is None or abs(value) <= int_limit)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list) or (int_limit is not None and len(value) > int_limit):
            return False
        element = args[0] if args else typing.Any
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            return len(value) == len(args) and all(fits(v, a, int_limit) for v, a in zip(value, args))
        return all(fits(v, element, int_limit) for v in value)
    if origin is typing.Literal:
        return value in args
    return not any(isinstance(v, int) and not isinstance(v, bool) and int_limit is not None and abs(v) > int_limit
                   for v in _leaves(value))


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value

