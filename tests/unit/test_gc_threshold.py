"""The serving app raises the garbage collector's first threshold (flowkeeper.gcpolicy):
only upwards, only while collection is on, never when told not to."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from flowkeeper import ConfigurationError, FlowKeeper
from flowkeeper.gcpolicy import DEFAULT_GEN0

KEY = "unit-test-signing-key-0123456789abcdef"
URL = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def test_the_serving_app_raises_cpythons_first_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    FlowKeeper(URL, KEY).asgi()
    assert gc.get_threshold() == (DEFAULT_GEN0, 10, 10)  # the older generations as they were


def test_a_wsgi_app_raises_it_too() -> None:
    gc.set_threshold(700, 7, 9)
    FlowKeeper(URL, KEY).wsgi()
    assert gc.get_threshold() == (DEFAULT_GEN0, 7, 9)


def test_constructing_a_flowkeeper_alone_changes_nothing() -> None:
    gc.set_threshold(700, 10, 10)
    FlowKeeper(URL, KEY)  # a trigger-only process: not serving invocations
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("mine", [DEFAULT_GEN0, 100_000])
def test_a_threshold_the_process_set_higher_is_kept(mine: int) -> None:
    gc.set_threshold(mine, 10, 10)
    FlowKeeper(URL, KEY, gc_threshold=5_000).asgi()
    assert gc.get_threshold() == (mine, 10, 10)


def test_collection_turned_off_stays_off_and_untouched() -> None:
    gc.set_threshold(700, 10, 10)
    gc.disable()
    FlowKeeper(URL, KEY).asgi()
    assert not gc.isenabled() and gc.get_threshold() == (700, 10, 10)


def test_none_leaves_the_collector_alone() -> None:
    gc.set_threshold(700, 10, 10)
    FlowKeeper(URL, KEY, gc_threshold=None).asgi()
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize(
    "value", [0, -1, 699, 10_000_001, 10**30, 1.5, "20000", True, None.__class__]
)
def test_bad_thresholds_are_refused_at_construction(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="gc_threshold"):
        FlowKeeper(URL, KEY, gc_threshold=value)
