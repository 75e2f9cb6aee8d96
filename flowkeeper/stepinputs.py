"""What a step's recorded input says about its arguments.

A step's input is recorded for people (the dashboard, ``runs show``), never
replayed: replay answers a step from its result alone.  So it need not hold
every byte, and in a pipeline it would mostly hold bytes the history already
has, since a step's argument is usually what an earlier step returned.  Two
rules keep it small:

- An argument that is the very object an earlier step (or the workflow's
  input) produced in this execution is not encoded at all: it is recorded as
  a placeholder (null) and listed under ``"$refs"``, e.g.
  ``{"args": [null], "kwargs": {}, "$refs": [["args", 0, "fetch"]]}``
  (``"$input"`` for the workflow's input).  ``get_run`` (so the dashboard and
  ``runs show``) puts the referenced value back in its place.
- Any other input whose JSON is longer than :data:`INPUT_CAP` characters is
  recorded as ``{"$truncated": {"size": ..., "sha256": ..., "preview": ...}}``:
  its size in characters, the SHA-256 of its JSON text (UTF-8) to compare
  with, and its first :data:`PREVIEW` characters.

The top-level object is always flowkeeper's own, so a user's value that
happens to look like a placeholder is never taken for one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from .serialization import dumps_best_effort

#: Longest recorded input, in characters of JSON; longer ones are summarised.
INPUT_CAP: Final = 4096
#: How much of a summarised input is kept as a preview.
PREVIEW: Final = 512

# Values too small or too immutable to be worth a reference (and whose ids the
# interpreter shares between unrelated objects: small ints, interned strings).
_SCALARS = (bool, int, float, type(None))


class InputRecorder:
    """Records step inputs for one execution of a workflow."""

    __slots__ = ("_enabled", "_sources")

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        # id -> (the object itself, kept alive so its id is not reused; source)
        self._sources: dict[int, tuple[Any, str]] = {}

    def produced(self, value: Any, source: str) -> None:
        """``value`` was handed to the workflow by ``source`` (a step key, or "$input")."""
        if self._enabled and not isinstance(value, _SCALARS):
            self._sources[id(value)] = (value, source)

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The JSON to record as the input of a step called with these arguments."""
        if not self._enabled or (not args and not kwargs):
            return None
        refs: list[list[Any]] = []
        shown_args = [self._shown(a, "args", i, refs) for i, a in enumerate(args)]
        shown_kwargs = {k: self._shown(v, "kwargs", k, refs) for k, v in kwargs.items()}
        shown: dict[str, Any] = {"args": shown_args, "kwargs": shown_kwargs}
        if refs:
            shown["$refs"] = refs
        text = dumps_best_effort(shown)
        if len(text) <= INPUT_CAP:
            return text
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        summary = {"size": len(text), "sha256": digest, "preview": text[:PREVIEW]}
        return json.dumps({"$truncated": summary}, ensure_ascii=False)

    def _shown(self, value: Any, where: str, at: int | str, refs: list[list[Any]]) -> Any:
        source = self._sources.get(id(value))
        if source is None or source[0] is not value:
            return value
        refs.append([where, at, source[1]])
        return None


def resolve(recorded: Any, outputs: Mapping[str, Any], run_input: Any) -> Any:
    """A recorded input with its references replaced by the values they name.

    ``outputs`` maps step keys to their recorded outputs.  A reference to a
    step that is no longer in the history is left as ``{"$output_of": key}``.
    """
    if not isinstance(recorded, dict) or "$refs" not in recorded:
        return recorded
    refs = recorded.get("$refs")
    args = list(recorded.get("args") or [])
    kwargs = dict(recorded.get("kwargs") or {})
    for ref in refs if isinstance(refs, list) else []:
        if not (isinstance(ref, list) and len(ref) == 3):
            continue
        where, at, source = ref
        if source == "$input":
            value = run_input
        elif source in outputs:
            value = outputs[source]
        else:
            value = {"$output_of": source}
        if where == "args" and isinstance(at, int) and 0 <= at < len(args):
            args[at] = value
        elif where == "kwargs" and isinstance(at, str):
            kwargs[at] = value
    return {"args": args, "kwargs": kwargs}
