"""Parsers of single option values (from flags, a config file or a saved run's config): each
turns a raw value into the option's type or refuses it in one line naming the option.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from cache.errors import UserError


def _fail(name: str, value: Any, want: str) -> UserError:
    return UserError(f"--{name.replace('_', '-')}: {value!r} is not {want}")


def _int(minimum: int) -> Callable:
    def parse(value, name):
        if isinstance(value, bool):
            raise _fail(name, value, "an integer")
        try:
            number = int(str(value))
        except ValueError:
            raise _fail(name, value, "an integer") from None
        if number < minimum:
            raise _fail(name, value, f"an integer >= {minimum}")
        return number
    return parse


def _float(minimum: float, *, strict: bool = False) -> Callable:
    def parse(value, name):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _fail(name, value, "a number") from None
        if not math.isfinite(number) or number < minimum or (strict and number == minimum):
            raise _fail(name, value, f"a number {'>' if strict else '>='} {minimum}")
        return number
    return parse


def _bool(value, name):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _fail(name, value, "true or false")


def _str(value, name):
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value) == "":
        raise _fail(name, value, "a non-empty string")
    return str(value)


def _choice(choices: tuple[str, ...], *, none_word: str | None = None) -> Callable:
    def parse(value, name):
        text = str(value).strip().lower()
        if none_word is not None and (value is None or text == none_word):
            return None
        if text not in choices:
            allowed = list(choices) + ([none_word] if none_word else [])
            raise UserError(f"--{name.replace('_', '-')}: {value!r} is not one of: {', '.join(allowed)}")
        return text
    return parse


def _encoder_weights(value, name):
    if value is None or str(value).strip().lower() in ("none", "null", ""):
        return None
    return _str(value, name)


def _pair(value, name, cast, sep_words: str) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (cast(value), cast(value))
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        text = str(value).strip().lower()
        parts = text.replace("x", ",").split(",") if "," in text or "x" in text else [text]
    if len(parts) == 1:
        parts = parts * 2
    try:
        pair = tuple(cast(str(p).strip()) for p in parts)
    except ValueError:
        raise _fail(name, value, sep_words) from None
    if len(pair) != 2:
        raise _fail(name, value, sep_words)
    return pair


def _res(value, name):
    """640 -> (640, 640); "512x1024" or [512, 1024] -> (512, 1024) as (height, width)."""
    pair = _pair(value, name, int, "a size like 640 or 512x1024 (height x width)")
    if min(pair) < 1:
        raise _fail(name, value, "a positive size")
    return pair


def _scale(value, name):
    """"0.5,2.0" or [0.5, 2.0] -> (0.5, 2.0); one number -> a fixed scale."""
    pair = _pair(value, name, float, "a range like 0.5,2.0")
    if not 0 < pair[0] <= pair[1]:
        raise _fail(name, value, "a range low,high with 0 < low <= high")
    return pair


def _auto(parse: Callable) -> Callable:
    """None, "none" or "auto" -> None (decided at run time, per machine), else `parse`."""
    def wrapped(value, name):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        return _optional(parse)(value, name)
    return wrapped


def _optional(parse: Callable) -> Callable:
    def wrapped(value, name):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return parse(value, name)
    return wrapped


def _model_kwargs(value, name):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(name, value, "a mapping of keyword arguments")
    return {key: (tuple(v) if isinstance(v, list) else v) for key, v in value.items()}
