from flowkeeper.cli.common import plural


def test_plural() -> None:
    assert plural(1, "run") == "1 run"
    assert plural(0, "run") == "0 runs"
    assert plural(2, "failed run") == "2 failed runs"
    assert plural(3, "child", "children") == "3 children"
