"""What the fault suite did, added up over the session and printed at its end.

Each fault test adds its counts with :func:`record`; ``conftest.py`` prints
the totals in pytest's terminal summary.  The two counts that must stay 0 are
also asserted by the tests themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class FaultSummary:
    runs_driven: int = 0
    kills_injected: int = 0
    stalls_injected: int = 0  # SIGSTOP past the lease, then SIGCONT
    duplicates_attempted: int = 0
    bad_inputs_tried: int = 0
    lost_attempt_runs: int = 0  # runs whose step killed its own process
    lost_attempts_counted: int = 0
    poison_runs: int = 0  # NaN results, NUL errors, sync timeouts, dict loops, operator actions
    runs_lost: int = 0
    runs_never_ended: int = 0
    recorded_steps_reexecuted: int = 0
    overlapping_attempts: int = 0
    children_started: int = 0
    children_started_twice: int = 0
    tests: int = 0

    def lines(self) -> list[str]:
        labels = {
            "runs_driven": "runs driven",
            "kills_injected": "kills injected (SIGKILL: app server, scheduler, PostgreSQL)",
            "stalls_injected": "stalls injected (SIGSTOP past the lease)",
            "duplicates_attempted": "duplicate / stale signed invocations",
            "bad_inputs_tried": "bad inputs tried at the endpoint",
            "lost_attempt_runs": "runs whose step killed its process (os._exit, SIGKILL)",
            "lost_attempts_counted": "attempts lost with their process, counted",
            "poison_runs": "runs with poison values or operator actions mid-run",
            "runs_lost": "runs lost (must be 0)",
            "runs_never_ended": "runs that never ended (must be 0)",
            "recorded_steps_reexecuted": "recorded steps re-executed (must be 0)",
            "overlapping_attempts": "step attempts that overlapped (must be 0)",
            "children_started": "child runs started",
            "children_started_twice": "children started twice (must be 0)",
        }
        return [
            f"{labels[f.name]:62} {getattr(self, f.name)}" for f in fields(self) if f.name in labels
        ]


SUMMARY = FaultSummary()


def record(**counts: int) -> None:
    """Add one test's counts (any FaultSummary field) to the session totals."""
    SUMMARY.tests += 1
    for name, value in counts.items():
        setattr(SUMMARY, name, getattr(SUMMARY, name) + value)
