from __future__ import annotations

import random
from datetime import timedelta

import pytest

from flowkeeper import NonRetriableError, RetryAfterError, RetryPolicy


def test_defaults_are_five_attempts_from_one_second() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 5
    assert policy.initial_delay == 1.0
    no_jitter = RetryPolicy(jitter=0)
    assert [no_jitter.delay_for(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(jitter=0, max_delay=10)
    assert policy.delay_for(20) == 10


def test_jitter_stays_within_its_band_and_varies() -> None:
    policy = RetryPolicy(initial_delay=4, jitter=0.25)
    rng = random.Random(7)
    delays = [policy.delay_for(1, rng=rng) for _ in range(200)]
    assert all(3.0 <= d <= 5.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100


def test_should_retry_counts_the_first_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    err = RuntimeError("x")
    assert policy.should_retry(1, err)
    assert policy.should_retry(2, err)
    assert not policy.should_retry(3, err)
    assert not RetryPolicy.none().should_retry(1, err)


def test_non_retriable_is_never_retried() -> None:
    assert not RetryPolicy(max_attempts=10).should_retry(1, NonRetriableError("card declined"))


def test_errors_may_ask_for_their_own_delay() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.next_delay(1, RetryAfterError(delay=timedelta(minutes=2))) == 120
    assert policy.next_delay(1, RetryAfterError("rate limited", delay=7)) == 7

    class RateLimited(Exception):
        retry_after = 3.5

    assert policy.next_delay(4, RateLimited()) == 3.5
    assert policy.next_delay(1, RuntimeError()) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_delay": -1}, {"backoff": 0.5}, {"jitter": 2}],
)
def test_invalid_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


def test_negative_retry_after_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        RetryAfterError(delay=-1)
