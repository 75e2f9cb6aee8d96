from __future__ import annotations

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from flowkeeper import (
    Context,
    DuplicateWorkflowError,
    InvalidInputError,
    UnknownWorkflowError,
    WorkflowError,
    define_workflow,
)
from flowkeeper.workflow import Registry


class Order(BaseModel):
    id: str
    amount: int


async def checkout(ctx: Context, order: Order) -> None:
    return None


def test_input_is_validated_with_the_pydantic_message() -> None:
    wf = define_workflow("checkout", checkout)
    assert wf.input_type is Order
    with pytest.raises(InvalidInputError) as err:
        wf.dump_input({"id": "o1", "amount": "lots"})
    message = str(err.value)
    assert "no run was created" in message
    assert "amount" in message
    assert "valid integer" in message  # pydantic's own words


def test_input_is_normalised_to_json() -> None:
    wf = define_workflow("checkout", checkout)
    assert wf.dump_input(Order(id="o1", amount=3)) == '{"id":"o1","amount":3}'
    assert wf.load_input('{"id":"o1","amount":3}') == Order(id="o1", amount=3)


class Payload(TypedDict):
    n: int


def test_typed_dict_annotations() -> None:
    async def wf_fn(ctx: Context, payload: Payload) -> int:
        return 0

    wf = define_workflow("td", wf_fn)
    assert wf.dump_input({"n": "5"}) == '{"n":5}'
    with pytest.raises(InvalidInputError):
        wf.dump_input({"m": 1})


def test_workflow_without_input_refuses_one() -> None:
    async def no_input(ctx: Context) -> None:
        return None

    wf = define_workflow("none", no_input)
    assert wf.dump_input(None) == "null"
    with pytest.raises(InvalidInputError, match="takes no input"):
        wf.dump_input({"x": 1})


def test_sync_workflow_functions_are_refused() -> None:
    def sync(ctx: Context) -> None:
        return None

    with pytest.raises(WorkflowError, match="async def"):
        define_workflow("sync", sync)  # type: ignore[arg-type]


def test_wrong_arity_is_refused() -> None:
    async def three(ctx: Context, a: int, b: int) -> None:
        return None

    with pytest.raises(WorkflowError, match=r"\(ctx\) or \(ctx, input\)"):
        define_workflow("three", three)


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "x" * 201])
def test_bad_names(name: str) -> None:
    with pytest.raises(WorkflowError):
        define_workflow(name, checkout)


def test_registry_names_and_duplicates() -> None:
    registry = Registry()
    wf = registry.add(define_workflow("checkout", checkout))
    assert registry.add(define_workflow("checkout", checkout)).fn is wf.fn  # same fn: fine

    async def other(ctx: Context) -> None:
        return None

    with pytest.raises(DuplicateWorkflowError):
        registry.add(define_workflow("checkout", other))
    with pytest.raises(UnknownWorkflowError) as err:
        registry.get("chekout")
    assert "checkout" in str(err.value)  # lists what is registered


def test_unresolvable_annotations_are_reported() -> None:
    class Local(BaseModel):
        x: int

    async def wf_fn(ctx: Context, payload: Local) -> None:
        return None

    # With postponed annotations a class local to a function cannot be resolved.
    with pytest.raises(WorkflowError, match="module level"):
        define_workflow("local", wf_fn)


class Opaque:
    pass


def test_annotations_pydantic_cannot_validate_are_reported() -> None:
    async def wf_fn(ctx: Context, payload: Opaque) -> None:
        return None

    with pytest.raises(WorkflowError, match="cannot validate its input annotation"):
        define_workflow("opaque", wf_fn)
