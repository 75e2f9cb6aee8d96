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
import typing
import weakref
from collections.abc import Callable
from typing import Any

import pydantic
import pydantic_core

from .errors import SerializationError

logger = logging.getLogger("flowkeeper")

_NO_HINT: Any = object()
_hint_cache: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def dumps(value: Any, *, what: str) -> str:
    """Serialise ``value`` to JSON text, or raise a SerializationError naming ``what``."""
    try:
        text = pydantic_core.to_json(value).decode()
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise SerializationError(
            f"{what} is a {type(value).__qualname__}, which cannot be stored as JSON ({exc}). "
            "Return JSON-compatible data (dict, list, str, int, float, bool, None) "
            "or a pydantic model."
        ) from exc
    if "\\u0000" in text:
        raise SerializationError(
            f"{what} contains a NUL character (\\u0000), which Postgres cannot store in JSON. "
            "Strip NUL characters or encode binary data (e.g. base64)."
        )
    return text


def json_or_none(text: str | None) -> Any:
    """Stored JSON text as Python data (None stays None)."""
    return json.loads(text) if text is not None else None


def dumps_best_effort(value: Any) -> str:
    """JSON for display only (step arguments): never fails, falls back to repr."""
    try:
        return pydantic_core.to_json(value, fallback=repr).decode()
    except Exception:
        return json.dumps(repr(value))


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


def loads(text: str | None, hint: Any = None, tag: str | None = None, *, what: str) -> Any:
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
