"""JSON in and out of Postgres: workflow inputs, step results, run outputs.

Values are stored as JSON.  A value goes back to its Python type through a
pydantic ``TypeAdapter`` of the annotation that describes it (the step
function's return annotation, the workflow's input parameter); a pydantic model
returned without an annotation is tagged with its class so it comes back as
that model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import logging
import math
import re
import typing
import weakref
from collections.abc import Callable
from typing import Any, Final

import pydantic
import pydantic_core

from .errors import SerializationError

logger = logging.getLogger("flowkeeper")

_NO_HINT: Any = object()
_hint_cache: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


# A JSON-escaped NUL (\u0000) not itself escaped: an odd run of backslashes before it.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_NUL_ESCAPE_BYTES = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_NONFINITE = ("NaN", "Infinity")
_NONFINITE_BYTES = (b"NaN", b"Infinity")


def _reject_constant(token: str) -> Any:
    raise ValueError(token)


def has_nonfinite(text: str | bytes) -> bool:
    """Whether JSON text holds a bare NaN/Infinity (not merely the word inside a string)."""
    # The fast paths: a one-byte scan (memchr, ~50x faster than a multi-byte
    # substring search on 500 KB of text), then a C substring scan.
    if isinstance(text, bytes):
        if (b"N" not in text and b"I" not in text) or not any(
            token in text for token in _NONFINITE_BYTES
        ):
            return False
    elif ("N" not in text and "I" not in text) or not any(token in text for token in _NONFINITE):
        return False
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return True
    return False


def has_nul(text: str) -> bool:
    """Whether JSON text holds an escaped NUL character (which Postgres cannot store)."""
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None


def dumps(value: Any, *, what: str) -> str:
    """Serialise ``value`` to JSON text, or raise a SerializationError naming ``what``.

    Refuses, with a message saying why, everything Postgres cannot store or JSON
    cannot represent: NaN and infinities, NUL characters and lone surrogates.
    """
    return _checked_json(value, what).decode()


#: JSON longer than this (bytes) is kept as bytes by :func:`dumps_for_storage`.
LARGE_JSON: Final = 8_000_000


def dumps_for_storage(value: Any, *, what: str) -> str | bytes:
    """As :func:`dumps`, but a large value stays UTF-8 bytes (no second copy as str).

    The store sends such a value ahead in chunks (see Store.commit); everything
    that reads it back (``loads``) takes bytes as well as text.
    """
    data = _checked_json(value, what)
    return data if len(data) > LARGE_JSON else data.decode()


def _checked_json(value: Any, what: str) -> bytes:
    try:
        data = pydantic_core.to_json(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        if "surrogates not allowed" in str(exc):
            raise SerializationError(
                f"{what} contains a lone surrogate character (half of a UTF-16 pair, often "
                "from decoding bytes with errors='surrogateescape'), which is not valid "
                "Unicode text and cannot be stored. Decode the bytes properly or encode them "
                "(e.g. base64)."
            ) from exc
        raise SerializationError(
            f"{what} is a {type(value).__qualname__}, which cannot be stored as JSON ({exc}). "
            "Return JSON-compatible data (dict, list, str, int, float, bool, None) "
            "or a pydantic model."
        ) from exc
    if b"\\u0000" in data and _NUL_ESCAPE_BYTES.search(data) is not None:
        raise SerializationError(
            f"{what} contains a NUL character (\\u0000), which Postgres cannot store in JSON. "
            "Strip NUL characters or encode binary data (e.g. base64)."
        )
    if has_nonfinite(data):
        raise SerializationError(
            f"{what} contains NaN or an infinity, which JSON cannot represent. Replace it "
            "with None or a string, or round it to a finite number, before returning it."
        )
    return data


def json_or_none(text: str | None) -> Any:
    """Stored JSON text as Python data (None stays None)."""
    return json.loads(text) if text is not None else None


def clean_text(text: str) -> str:
    """Text that Postgres can store whatever it held: NUL and lone surrogates made visible.

    For what flowkeeper only shows (error messages, tracebacks, event details),
    never for values a workflow reads back.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _displayable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth > 50:
        return clean_text(repr(value)[:1000])
    if isinstance(value, dict):
        return {clean_text(str(k)): _displayable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_displayable(v, depth + 1) for v in value]
    return clean_text(repr(value))


def display_json(value: Any) -> str:
    """JSON of a record flowkeeper only displays (errors, event details): never refused."""
    return json.dumps(_displayable(value), ensure_ascii=False)


def dumps_best_effort(value: Any) -> str:
    """JSON for display only (step arguments): never fails, falls back to repr."""
    try:
        text = pydantic_core.to_json(value, fallback=repr).decode()
    except Exception:
        return json.dumps(clean_text(repr(value)), ensure_ascii=False)
    if has_nul(text) or has_nonfinite(text):
        return display_json(json.loads(text))
    return text


@functools.lru_cache(maxsize=512)
def _adapter_cached(tp: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(tp)


def adapter_for(tp: Any) -> pydantic.TypeAdapter[Any]:
    """A (cached) TypeAdapter for an annotation."""
    try:
        return _adapter_cached(tp)
    except TypeError:  # unhashable annotation
        return pydantic.TypeAdapter(tp)


def return_hint(fn: Callable[..., Any]) -> Any:
    """The return annotation of a step function, or ``None`` when it has none."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    try:
        cached = _hint_cache.get(target, _NO_HINT)
    except TypeError:
        cached = _NO_HINT
    if cached is not _NO_HINT:
        return cached
    hint: Any = None
    try:
        hints = typing.get_type_hints(target)
        if "return" in hints:
            hint = hints["return"]
    except Exception:
        try:
            annotation = inspect.signature(target).return_annotation
            if annotation is not inspect.Signature.empty and not isinstance(annotation, str):
                hint = annotation
        except (TypeError, ValueError):
            hint = None
    with contextlib.suppress(TypeError):
        _hint_cache[target] = hint
    return hint


def type_tag(value: Any) -> str | None:
    """A class reference for a pydantic model (restores it without an annotation)."""
    if isinstance(value, pydantic.BaseModel):
        cls = type(value)
        return f"{cls.__module__}:{cls.__qualname__}"
    return None


def _resolve_tag(tag: str) -> Any:
    module_name, _, qualname = tag.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def loads(text: str | bytes | None, hint: Any = None, tag: str | None = None, *, what: str) -> Any:
    """Restore a stored JSON value as ``hint`` (or the tagged model class)."""
    if text is None:
        return None
    tp = hint
    if tp is None and tag:
        try:
            tp = _resolve_tag(tag)
        except Exception:
            logger.warning("cannot import %s to restore %s; returning plain JSON", tag, what)
            tp = None
    if tp is None:
        return json.loads(text)
    try:
        return adapter_for(tp).validate_json(text)
    except pydantic.ValidationError as exc:
        raise SerializationError(
            f"{what} does not match its annotation {getattr(tp, '__name__', tp)!r}: {exc}. "
            "Make the annotation describe the value the function returns."
        ) from exc
