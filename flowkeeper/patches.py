"""Versioning: ``ctx.patched`` and ``ctx.deprecate_patch`` let code change under live runs.

A deploy that adds, removes or reorders steps would make the runs started on
the old code fail with a :class:`DeterminismError` when they replay on the
new code.  Wrap the change instead::

    if ctx.patched("fraud-check-v2"):
        await ctx.step("fraud-check", check_fraud, order)  # the new code
    else:
        ...  # the old code, for runs that started before the deploy

``patched`` answers, deterministically and once per run:

- *True* when the run reaches the check at the end of its recorded history
  (a new run, or an old one that had not got this far): nothing recorded
  depends on the old code, so the new branch is safe;
- *False* when the run's history goes on past this point: it was recorded by
  code without the patch, so it replays the old branch.

The answer is recorded as a history entry of kind ``patch`` (key
``#patch:<id>``, output ``true``/``false``) that takes no position in the
sequence of operations: the old runs' histories, recorded without it, still
line up.  Every later invocation answers from the record.  Once no live run
is on the old branch (``flowkeeper runs list --patch ID``, or the dashboard's
patch counts), replace the ``if`` with ``ctx.deprecate_patch("fraud-check-v2")``
and delete the old branch; once no live run has the patch recorded at all,
delete that line too.  ``deprecate_patch`` fails a run that took the old
branch, with a message saying so, rather than replaying it wrongly.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DeterminismError, StepUsageError, WorkflowError
from .store import HistoryEntry, StepRecord, Store

if TYPE_CHECKING:
    from .engine import Execution

KIND = "patch"
PREFIX = "#patch:"  # '#' never starts a step key: user names may not contain it
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


def key_of(patch_id: str) -> str:
    return PREFIX + patch_id


def check_id(patch_id: str) -> str:
    if not isinstance(patch_id, str) or not _ID_RE.match(patch_id):
        raise StepUsageError(
            f"Patch id {patch_id!r} is not valid: use 1-200 letters, digits and . _ : - "
            "(starting with a letter or digit), e.g. 'fraud-check-v2'."
        )
    return patch_id


def split(history: list[HistoryEntry]) -> tuple[list[HistoryEntry], dict[str, HistoryEntry]]:
    """The operations' history (one entry per position) and the recorded patch markers."""
    if not any(h.kind == KIND for h in history):
        return history, {}
    markers = {h.key[len(PREFIX) :]: h for h in history if h.kind == KIND}
    return [h for h in history if h.kind != KIND], markers


class PatchState:
    """The patches of one execution: what was recorded, and where each was checked."""

    __slots__ = ("checked_at", "markers")

    def __init__(self, markers: dict[str, HistoryEntry]) -> None:
        self.markers = markers
        self.checked_at: dict[str, int] = {}


def patched(execution: Execution, patch_id: str) -> bool:
    """ctx.patched: True on new code paths, False for runs recorded before the patch."""
    check_id(patch_id)
    state = _state(execution, patch_id, "patched")
    entry = state.markers.get(patch_id)
    if entry is not None:
        return entry.output == "true"
    # Recorded history beyond this point was written by code without the patch.
    value = execution._position >= len(execution._history)
    _record(execution, state, patch_id, value)
    return value


def deprecate_patch(execution: Execution, patch_id: str) -> None:
    """ctx.deprecate_patch: the old branch is gone; a run that took it cannot go on."""
    check_id(patch_id)
    state = _state(execution, patch_id, "deprecate_patch")
    entry = state.markers.get(patch_id)
    if entry is not None:
        if entry.output != "true":
            execution._broken = DeterminismError(
                f"Run {execution.run_id} took the old branch of patch {patch_id!r} (it was "
                f"recorded before the patch), but the code now calls "
                f"ctx.deprecate_patch({patch_id!r}): the old branch was deleted while this run "
                f"still needed it. Deploy the `if ctx.patched({patch_id!r}): ... else: ...` "
                "code again until `flowkeeper runs list --patch "
                f"{patch_id}` shows no live run on the old branch.",
                step=key_of(patch_id),
                position=entry.position,
            )
            raise execution._broken
        return
    if execution._position < len(execution._history):
        return  # recorded before the patch existed: the old and new code agree from here
    _record(execution, state, patch_id, True)  # code that still checks it takes the new branch


def _state(execution: Execution, patch_id: str, call: str) -> PatchState:
    if execution._broken is not None:
        raise execution._broken
    execution._caller(patch_id, f"ctx.{call}")  # not from a thread, a step, after the end
    if execution._branches:
        # Positions inside concurrent branches depend on timing: a patch check
        # there could answer differently on replay.
        raise StepUsageError(
            f"ctx.{call}({patch_id!r}) was called inside concurrent branches "
            "(asyncio.gather, ctx.parallel, ctx.map): check patches in the workflow "
            "function before the branches start."
        )
    state: PatchState = execution._patches
    where = state.checked_at.setdefault(patch_id, execution._position)
    if where != execution._position:
        execution._broken = StepUsageError(
            f"Run {execution.run_id}: patch id {patch_id!r} was checked before position "
            f"{where} and again before position {execution._position}: one id guards one "
            "code change. Give each change its own id (e.g. 'fraud-check-v2' and "
            "'refund-v2'), or check it once and keep the answer in a variable."
        )
        raise execution._broken
    return state


def _record(execution: Execution, state: PatchState, patch_id: str, value: bool) -> None:
    now = execution.db_time()
    position = execution._position
    record = StepRecord(
        key=key_of(patch_id),
        position=position,
        name=patch_id,
        kind=KIND,
        status="completed",
        input=None,
        output="true" if value else "false",
        output_type=None,
        error=None,
        attempts=1,
        started_at=now,
        finished_at=now,
    )
    execution._pending_steps.append(record)
    state.markers[patch_id] = HistoryEntry(
        key=record.key,
        position=position,
        name=patch_id,
        kind=KIND,
        status="completed",
        output="true" if value else "false",
        output_type=None,
        error=None,
        attempts=1,
        wake_at=None,
    )


# code versions ------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"^[\x21-\x7e]{1,100}$")


def source_hash(fn: Callable[..., Any]) -> str:
    """A short hash of ``fn``'s source code: ``define_workflow(..., version=source_hash)``.

    It changes whenever the workflow function's text changes (not when a
    step function it calls does: set ``version="..."`` yourself for that).
    """
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError) as exc:
        raise WorkflowError(
            f"version=source_hash needs the source of {fn!r} ({exc}); set version='...' instead."
        ) from None
    return "src-" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def code_version(
    name: str, fn: Callable[..., Any], version: str | Callable[[Any], str] | None
) -> str | None:
    """The version recorded on each run of workflow ``name`` (checked at definition)."""
    if version is None:
        return None
    value = version(fn) if callable(version) else version
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise WorkflowError(
            f"Workflow {name!r}: version must be 1-100 printable ASCII characters without "
            f"spaces (e.g. '2026-12-01' or a git sha), got {value!r}."
        )
    return value


# live runs per branch (CLI and dashboard) --------------------------------------------------
@dataclass(frozen=True, slots=True)
class PatchBranches:
    """How many live runs of each workflow took each branch of a patch."""

    patch: str
    workflow: str
    old: int  # took the old branch: the old code is still needed for them
    new: int
    unreached: int = 0  # live, not at the patch yet (only filled for one patch's report)

    def as_json(self) -> dict[str, Any]:
        return {
            "patch": self.patch,
            "workflow": self.workflow,
            "old": self.old,
            "new": self.new,
            "unreached": self.unreached,
        }


async def live_branches(store: Store, patch_id: str | None = None) -> list[PatchBranches]:
    """Live runs per (patch, workflow) and branch; for one patch, also those not there yet."""
    if patch_id is not None:
        check_id(patch_id)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for row in await store.patch_counts():
        if patch_id is not None and row["patch"] != patch_id:
            continue
        slot = counts.setdefault((row["patch"], row["workflow"]), {"old": 0, "new": 0})
        slot["new" if row["new_branch"] else "old"] += int(row["n"])
    unreached: dict[str, int] = {}
    if patch_id is not None and counts:
        workflows = sorted({w for _, w in counts})
        for row in await store.patch_unreached(key_of(patch_id), workflows):
            unreached[row["workflow"]] = int(row["n"])
    return [
        PatchBranches(p, w, c["old"], c["new"], unreached.get(w, 0))
        for (p, w), c in sorted(counts.items())
    ]
