"""Retry delays are bounded and validated, whatever a step or a policy asks for.

Every delay a policy hands the engine becomes ``now() + interval`` in Postgres:
an infinite, NaN, negative or astronomically large one either crashes the
engine (timedelta overflow), loops the run through lease expiries (timestamp
out of range) or parks it for ever.  So: nonsense is refused where it is made
(RetryPolicy, RetryAfterError), a foreign exception's bad ``retry_after`` is
ignored with a warning, and every delay is finite and within [0, max_delay].
"""

from __future__ import annotations

import logging
import math
import random
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowkeeper import NonRetriableError, RetryAfterError, RetryPolicy
from flowkeeper.retry import LONGEST_DELAY

NONSENSE_FLOATS = [math.nan, math.inf, -math.inf, -1.0, -5e-324, -1e308]
policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 10_000),
    initial_delay=st.floats(0, 1e6, allow_nan=False),
    backoff=st.floats(1, 1e6, allow_nan=False),
    max_delay=st.floats(0, LONGEST_DELAY, allow_nan=False),
    jitter=st.floats(0, 1, allow_nan=False),
)
any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)


class BrokenFloat:
    def __float__(self) -> float:
        raise RuntimeError("__float__ exploded")


class WrongFloat:
    def __float__(self) -> Any:
        return "not a float"


class Foreign(Exception):
    """A third-party exception carrying a ``retry_after`` of any kind."""

    def __init__(self, retry_after: Any) -> None:
        super().__init__("rate limited")
        self.retry_after = retry_after


def _in_bounds(policy: RetryPolicy, delay: float) -> bool:
    return isinstance(delay, float) and math.isfinite(delay) and 0 <= delay <= policy.max_delay


# -- RetryPolicy itself ---------------------------------------------------------------
@pytest.mark.parametrize("field", ["initial_delay", "max_delay", "backoff", "jitter"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_policy_refuses_non_finite_fields(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"RetryPolicy\.{field} must be a finite number"):
        RetryPolicy(**{field: value})


@pytest.mark.parametrize("field", ["initial_delay", "max_delay", "backoff", "jitter"])
@pytest.mark.parametrize("value", [True, "1", None, object(), BrokenFloat()])
def test_policy_refuses_non_numbers(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"RetryPolicy\.{field} must be a number"):
        RetryPolicy(**{field: value})


@pytest.mark.parametrize("value", [0, -1, 2.5, math.inf, math.nan, True, "3", None])
def test_policy_refuses_bad_max_attempts(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=r"RetryPolicy\.max_attempts"):
        RetryPolicy(max_attempts=value)


def test_policy_refuses_a_max_delay_beyond_the_longest_delay() -> None:
    with pytest.raises(ValueError, match=r"RetryPolicy\.max_delay must be at most"):
        RetryPolicy(max_delay=LONGEST_DELAY * 2)
    RetryPolicy(max_delay=LONGEST_DELAY)  # the limit itself is fine


def test_an_initial_delay_above_max_delay_is_capped() -> None:
    assert RetryPolicy(initial_delay=60, max_delay=10, jitter=0).delay_for(1) == 10.0


def test_policy_accepts_integers_and_normalises_them_to_float() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=1, backoff=3, max_delay=30, jitter=0)
    assert isinstance(policy.max_delay, float)
    assert policy.delay_for(2) == 3.0


@given(
    policy=policies,
    attempt=st.integers(-(10**6), 10**9),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@example(
    policy=RetryPolicy(max_attempts=10_000, initial_delay=1, backoff=2, max_delay=300),
    attempt=5000,  # 2.0 ** 4999 overflows a float
    seed=0,
)
@example(policy=RetryPolicy(initial_delay=0, backoff=1e6), attempt=10**9, seed=1)
def test_backoff_is_finite_and_within_max_delay(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    delay = policy.delay_for(attempt, rng=random.Random(seed))
    assert _in_bounds(policy, delay)
    assert _in_bounds(policy, policy.next_delay(attempt, RuntimeError("boom")))


# -- RetryAfterError ------------------------------------------------------------------
@given(delay=any_float)
@example(delay=5e-324)
@example(delay=-0.0)
@example(delay=1e308)
def test_retry_after_error_refuses_nonsense_at_construction(delay: float) -> None:
    if math.isfinite(delay) and delay >= 0:
        err = RetryAfterError(delay=delay)
        assert err.delay == delay
        assert _in_bounds(RetryPolicy(), RetryPolicy().next_delay(1, err))
    else:
        with pytest.raises(ValueError, match=r"RetryAfterError delay must (be finite|not be)"):
            RetryAfterError(delay=delay)


@pytest.mark.parametrize("delay", [True, False, "5", None, object(), BrokenFloat(), WrongFloat()])
def test_retry_after_error_refuses_non_numbers(delay: Any) -> None:
    with pytest.raises(TypeError, match="RetryAfterError delay must be"):
        RetryAfterError(delay=delay)


@pytest.mark.parametrize(
    "delay", [timedelta.max, timedelta.min, timedelta(microseconds=-1), timedelta(0)]
)
def test_retry_after_error_with_timedelta_extremes(delay: timedelta) -> None:
    if delay < timedelta(0):
        with pytest.raises(ValueError, match="negative"):
            RetryAfterError(delay=delay)
        return
    policy = RetryPolicy(max_delay=600)
    got = policy.next_delay(1, RetryAfterError(delay=delay))
    assert got == min(delay.total_seconds(), 600.0)


@given(policy=policies, delay=st.floats(0, 1e308), attempt=st.integers(1, 10**6))
def test_a_requested_delay_is_capped_at_max_delay(
    policy: RetryPolicy, delay: float, attempt: int
) -> None:
    got = policy.next_delay(attempt, RetryAfterError(delay=delay))
    assert _in_bounds(policy, got)
    assert got == min(delay, policy.max_delay)


def test_a_retry_after_error_tampered_with_after_construction_falls_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    err = RetryAfterError(delay=3)
    err.delay = math.nan
    policy = RetryPolicy(jitter=0, initial_delay=2)
    with caplog.at_level(logging.WARNING, logger="flowkeeper"):
        assert policy.next_delay(1, err) == 2.0
    assert "ignored" in caplog.text


def test_non_retriable_still_wins_over_a_requested_delay() -> None:
    class Both(NonRetriableError):
        retry_after = 5

    assert not RetryPolicy().should_retry(1, Both("no"))


# -- a foreign exception's retry_after -------------------------------------------------
@given(
    policy=policies,
    attempt=st.integers(1, 10**6),
    value=st.one_of(
        any_float,
        st.integers(-(10**400), 10**400),
        st.timedeltas(),
        st.booleans(),
        st.text(max_size=20),
        st.sampled_from(["120", "1e999", "nan", "-3", "Wed, 21 Oct 2015 07:28:00 GMT"]),
        st.decimals(allow_nan=True, allow_infinity=True),
        st.fractions(),
        st.builds(BrokenFloat),
        st.builds(WrongFloat),
        st.builds(object),
        st.none(),
    ),
)
@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
def test_any_foreign_retry_after_gives_a_bounded_delay(
    policy: RetryPolicy, attempt: int, value: Any
) -> None:
    delay = policy.next_delay(attempt, Foreign(value))
    assert _in_bounds(policy, delay)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3.5, 3.5),
        (7, 7.0),
        (timedelta(seconds=90), 90.0),
        ("120", 120.0),  # an HTTP Retry-After header, as seconds
        (Decimal("2.5"), 2.5),
        (Fraction(1, 4), 0.25),
        (1e12, 300.0),  # honoured, but never beyond max_delay
        (5e-324, 5e-324),
    ],
)
def test_sensible_foreign_retry_after_is_honoured_within_max_delay(
    value: Any, expected: float
) -> None:
    policy = RetryPolicy(jitter=0, max_delay=300)
    assert policy.next_delay(1, Foreign(value)) == expected


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        -1,
        timedelta(seconds=-5),
        True,
        "soon",
        "nan",
        "1e999",
        BrokenFloat(),
        WrongFloat(),
        object(),
        10**400,
    ],
)
def test_bad_foreign_retry_after_is_ignored_with_a_warning(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(jitter=0, initial_delay=4, max_delay=300)
    with caplog.at_level(logging.WARNING, logger="flowkeeper"):
        assert policy.next_delay(2, Foreign(value)) == 8.0  # the backoff
    assert "retry_after" in caplog.text
    assert "Foreign" in caplog.text


def test_no_retry_after_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flowkeeper"):
        assert RetryPolicy(jitter=0).next_delay(1, Foreign(None)) == 1.0
        assert RetryPolicy(jitter=0).next_delay(1, RuntimeError()) == 1.0
    assert caplog.text == ""


def test_nonsense_floats_never_reach_the_engine() -> None:
    policy = RetryPolicy()
    for value in NONSENSE_FLOATS:
        assert _in_bounds(policy, policy.next_delay(1, Foreign(value)))
