from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flowkeeper import SerializationError
from flowkeeper.serialization import dumps, has_nonfinite, loads, return_hint, type_tag


class Charge(BaseModel):
    id: str
    amount: int
    at: dt.datetime


def typed_step() -> Charge:
    raise NotImplementedError


def untyped_step():  # type: ignore[no-untyped-def]
    raise NotImplementedError


def test_json_values_round_trip() -> None:
    value = {"a": [1, 2.5, None, True], "b": "x"}
    assert loads(dumps(value, what="v"), what="v") == value


def test_model_restored_through_the_return_annotation() -> None:
    charge = Charge(id="ch_1", amount=100, at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    text = dumps(charge, what="result")
    restored = loads(text, return_hint(typed_step), what="result")
    assert restored == charge
    assert isinstance(restored, Charge)


def test_model_restored_through_its_tag_without_annotation() -> None:
    charge = Charge(id="ch_2", amount=5, at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert return_hint(untyped_step) is None
    tag = type_tag(charge)
    assert tag == f"{__name__}:Charge"
    restored = loads(dumps(charge, what="r"), None, tag, what="r")
    assert isinstance(restored, Charge)
    assert restored.id == "ch_2"


def test_unserialisable_value_names_the_culprit() -> None:
    with pytest.raises(SerializationError) as err:
        dumps(object(), what="The result of step 'charge'")
    message = str(err.value)
    assert "The result of step 'charge'" in message
    assert "object" in message
    assert "pydantic model" in message


def test_nul_characters_are_refused_with_advice() -> None:
    with pytest.raises(SerializationError, match="NUL"):
        dumps({"x": "a\x00b"}, what="result")


def test_mismatched_annotation_is_reported() -> None:
    with pytest.raises(SerializationError, match="annotation"):
        loads('"not a charge"', Charge, what="result")


def test_return_hint_sees_through_partials() -> None:
    import functools

    def f(x: int) -> dict[str, Any]:
        return {}

    assert return_hint(functools.partial(f, 1)) == dict[str, Any]


# -- dumps_for_storage: a large value stays bytes, refused exactly as dumps refuses --
@pytest.mark.parametrize(
    "bad",
    [
        ["x" * 100, float("nan")],
        {"k": "x" * 100, "v": float("-inf")},
        ["x" * 100, "a\x00b"],
        ["x" * 100, "\ud800"],
    ],
)
def test_a_large_value_is_refused_like_a_small_one(
    bad: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowkeeper import serialization

    monkeypatch.setattr(serialization, "LARGE_JSON", 10)
    with pytest.raises(SerializationError) as large:
        serialization.dumps_for_storage(bad, what="The result")
    with pytest.raises(SerializationError) as small:
        serialization.dumps(bad, what="The result")
    assert str(large.value) == str(small.value)


def test_a_large_value_stays_bytes_and_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowkeeper import serialization

    monkeypatch.setattr(serialization, "LARGE_JSON", 10)
    value = {"b": ["é" * 20, 1e16, -0.0, "NaN", "Infinity \\u0000"], "a": None}
    data = serialization.dumps_for_storage(value, what="x")
    assert isinstance(data, bytes)
    assert data.decode() == serialization.dumps(value, what="x")
    back = serialization.loads(data, None, None, what="x")
    assert back == value and list(back) == ["b", "a"]
    assert isinstance(serialization.dumps_for_storage([1], what="x"), str)


_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_JSONISH = st.recursive(
    st.none() | st.booleans() | _FLOATS | st.text(alphabet='NaInfity"\\ ,:[]{}x'),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _has_nonfinite_float(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_nonfinite_float(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nonfinite_float(v) for v in value.values())
    return False


@settings(max_examples=400, deadline=None)
@given(_JSONISH)
def test_nonfinite_detection_agrees_with_the_value(value: Any) -> None:
    # The one-byte prefilter must never hide a bare NaN/Infinity, and the words
    # inside strings (keys included) must never count as one.
    data = pydantic_core.to_json(value)
    expected = _has_nonfinite_float(value)
    assert has_nonfinite(data) is expected
    assert has_nonfinite(data.decode()) is expected
