"""Node outputs are serialised once: the text made at the node boundary is what the
database stores; the iterative check keeps its repairs on the fast path."""

from __future__ import annotations

import enum
import gc
import json
import math
import time
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbuilder.platform.engine.outputs import Unstorable, storable_outputs, storable_outputs_text
from flowbuilder.platform.jsonvalues import (
    SerialisedJSON,
    bad_string_reason,
    depth_of,
    dumps_json,
    make_storable,
    object_text,
)


class _Color(enum.IntEnum):
    RED = 1


class _Tag(str):
    pass


def test_outputs_text_is_the_serialisation_of_what_is_stored() -> None:
    clean, text = storable_outputs_text(
        {"a": [1, "x\x00"], "b": math.nan, "ü": "é"}, max_bytes=10_000, max_depth=10
    )
    assert clean == {"a": [1, "x\ufffd"], "b": None, "ü": "é"}
    assert json.loads(text) == clean
    capped, capped_text = storable_outputs_text(
        {"big": "x" * 5000, "small": 1}, max_bytes=1000, max_depth=10
    )
    assert capped["big"] == {"_truncated": True, "size_bytes": 5002} and capped["small"] == 1
    assert json.loads(capped_text) == capped and len(capped_text.encode()) <= 1000
    assert storable_outputs({"k": 1}, max_bytes=100, max_depth=3) == {"k": 1}


def test_serialised_json_is_written_as_its_text_and_reads_as_a_dict() -> None:
    value = SerialisedJSON({"a": 1}, '{"a":1}')
    assert dumps_json(value) == '{"a":1}' and dumps_json({"b": 2}) == json.dumps({"b": 2})
    assert json.dumps(value) == '{"a": 1}'  # an engine without dumps_json: the dict itself
    assert value == {"a": 1} and isinstance(value, dict)


def test_a_stored_serialised_json_reads_back(engine: sa.Engine) -> None:
    table = sa.Table(
        "t_serialised_json",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("doc", sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")),
    )
    table.create(engine)
    try:
        with engine.begin() as conn:
            # The text wins over the dict: proof that it is what the engine writes.
            conn.execute(table.insert(), {"id": 1, "doc": SerialisedJSON({"a": 1}, '{"a":2}')})
            assert conn.execute(sa.select(table.c.doc)).scalar_one() == {"a": 2}
    finally:
        table.drop(engine)


def test_make_storable_fast_path_keeps_subclasses_and_checks_every_string() -> None:
    value = {"c": _Color.RED, "t": _Tag("x"), "f": 1.5, "b": True, "n": None, "ключ": "знач"}
    out = make_storable(value, max_depth=5, repair=False)
    assert out == value and out is not value
    repaired = make_storable(
        {"l": ["ok", "bad\x00", {"k\x00": -math.inf}], 7: (1, 2)}, max_depth=5, repair=True
    )
    assert repaired == {"l": ["ok", "bad\ufffd", {"k\ufffd": None}], "7": [1, 2]}


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, {"b": 'x"]}\\\\'}], "n": None, "f": 1.5, "t": True},
        {True: 1, None: 2, 3: "int key", 1.5: "float key", "tuple": (1, (2, 3))},
        {"unicode": "é€😀", "empty": {}, "list": []},
        {"nul": "a\x00b", "ok": 1},
        {"nan": math.nan, "inf": [math.inf]},
        {"lone": "\ud800", "key\x00": 1},
        {"obj": object(), "escape text": "\\u0000"},
        {"deep": [[[[["bottom"]]]]]},
    ],
)
def test_the_json_round_trip_fast_path_agrees_with_make_storable(value: dict) -> None:
    """Outputs go through a C JSON round trip when they need no repair, and through
    make_storable otherwise: whichever path, the stored text and copy are the same."""
    from flowbuilder.platform.engine import outputs

    expected = make_storable(value, max_depth=7, repair=True)
    clean, text = storable_outputs_text(value, max_bytes=10**6, max_depth=7)
    assert clean == expected
    assert json.loads(text) == expected
    fast = outputs._plain_copy(value, 7)
    if fast is not None:  # taken only when nothing needed a repair
        assert fast[0] == expected and "\ufffd" not in fast[1]


def test_the_fast_path_refuses_what_is_too_deep_like_make_storable() -> None:
    from flowbuilder.platform.engine import outputs

    value = {"a": [{"b": [1]}]}  # four levels of containers
    assert outputs._plain_copy(value, 4) is not None
    assert outputs._plain_copy(value, 3) is None
    with pytest.raises(Unstorable):
        storable_outputs_text(value, max_bytes=10**6, max_depth=3)


# ------------------------------------------------------------ the fast path, exhaustively


class _Float(float):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


_TRAPS = ['"', "\\", "[", "]", "{", "}", "\x00", "\ud800", "\udc00", "é", "😀", "\\u0000", "a"]
_strings = st.lists(st.sampled_from(_TRAPS), max_size=6).map("".join)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and the infinities included
    _strings,
    _strings.map(_Tag),
    st.sampled_from([_Color.RED, _Float(2.5), _Float("nan")]),
)
_keys = st.one_of(
    _strings, st.integers(), st.floats(), st.booleans(), st.none(), _strings.map(_Tag)
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
        st.dictionaries(st.text(max_size=3), children, max_size=4).map(_Dict),
    )


_values = st.recursive(_scalars, _containers, max_leaves=40)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=5), st.integers(min_value=2, max_value=6))
def test_storable_outputs_text_agrees_with_make_storable(value: dict, max_depth: int) -> None:
    """Whatever the path (the C round trip with its checks on the text, or the Python
    pass): the same copy, or the same refusal; the text and each value's text are those
    of the copy, so what the next phase gets is what the database gives back."""
    try:
        expected = make_storable(value, max_depth=max_depth, repair=True)
    except Unstorable:
        with pytest.raises(Unstorable):
            storable_outputs_text(value, max_bytes=10**7, max_depth=max_depth)
        return
    clean, text = storable_outputs_text(value, max_bytes=10**7, max_depth=max_depth)
    assert clean == expected and json.loads(text) == expected
    assert type(clean) is SerialisedJSON and clean.text is text
    text.encode()  # UTF-8: no lone surrogate
    assert "\x00" not in text and "\\u0000" not in text.replace("\\\\", "")
    if clean.parts is not None:
        assert list(clean.parts) == list(clean)
        assert all(json.loads(part) == clean[key] for key, part in clean.parts.items())
        assert text == object_text(clean.parts)


def _storable(text: str) -> bool:
    return bad_string_reason(text) is None


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), _strings.filter(_storable)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(_strings.filter(_storable), children, max_size=3),
    ),
    max_leaves=30,
)


@settings(max_examples=600, deadline=None)
@given(_json_values, st.integers(min_value=1, max_value=12))
def test_the_depth_read_from_the_text_is_the_depth_of_the_value(value, max_depth) -> None:
    """Brackets and quotes inside strings (escaped or not) never count; deeper than the
    peeling passes, the rest is counted."""
    from flowbuilder.platform.engine import outputs

    for text in (json.dumps(value, ensure_ascii=False, separators=(",", ":")), json.dumps(value)):
        assert outputs._too_deep(text.encode(), max_depth) == (
            depth_of(value, max_depth) > max_depth
        )


@pytest.mark.parametrize("levels", [9, 20, 64, 65, 300])
@pytest.mark.parametrize("kind", ["list", "dict", "mixed"])
def test_depth_exactly_at_and_above_the_cap(levels: int, kind: str) -> None:
    from flowbuilder.platform.engine import outputs

    value: Any = '[{\\"]}'
    for level in range(levels - 1):  # the outputs object itself is one level
        use_list = kind == "list" or (kind == "mixed" and level % 2 == 0)
        value = [value, "]"] if use_list else {"}": value, "k": "{["}
    deep = {"v": value}
    assert depth_of(deep, levels + 1) == levels
    for max_depth in (levels - 1, levels, levels + 1):
        if levels <= max_depth:
            clean, text = storable_outputs_text(deep, max_bytes=10**7, max_depth=max_depth)
            assert clean == deep and outputs._plain_copy(deep, max_depth) is not None
        else:
            assert outputs._plain_copy(deep, max_depth) is None
            with pytest.raises(Unstorable, match="nested deeper"):
                storable_outputs_text(deep, max_bytes=10**7, max_depth=max_depth)


@pytest.mark.parametrize("container", ["list", "dict"])
def test_deep_nesting_is_refused_without_recursion_error(container: str) -> None:
    value: Any = 1
    for _ in range(100_000):
        value = [value] if container == "list" else {"k": value}
    with pytest.raises(Unstorable, match="nested deeper than 64"):
        storable_outputs_text({"v": value}, max_bytes=10**7, max_depth=64)


def test_the_fast_path_traps() -> None:
    """What the round trip must turn into what make_storable makes (or leave to it)."""
    from flowbuilder.platform.engine import outputs

    cases = [
        {"t": (1, (2, [3]))},  # tuples: lists
        {2: "int", 1.5: "float", True: "bool", None: "none", "s": 0},  # keys: their JSON text
        {_Tag("k"): _Tag("v"), "c": _Color.RED, "f": _Float(0.25), "d": _Dict(a=1)},
        {"k\x00": 1},  # a NUL key
        {"k\ud800": 1},  # a lone surrogate in a key
        {"v": "\udc00x"},
        {"v": _Float("nan")},
        {"q": 'a"b\\', '"\\': "[", "]": "{{"},  # quotes, backslashes and brackets in strings
    ]
    for value in cases:
        expected = make_storable(value, max_depth=8, repair=True)
        clean, text = storable_outputs_text(value, max_bytes=10**6, max_depth=8)
        assert clean == expected and json.loads(text) == expected, value
        assert [type(k) for k in clean] == [str] * len(clean)
        fast = outputs._plain_copy(value, 8)
        if fast is not None:
            assert fast[0] == expected
    assert outputs._plain_copy({"k\x00": 1}, 8) is None
    assert outputs._plain_copy({"k\ud800": 1}, 8) is None
    assert storable_outputs_text({"k\ud800": 1}, max_bytes=100, max_depth=8)[0] == {
        "k\ufffd\ufffd\ufffd": 1
    }


def test_numbers_booleans_and_nulls_are_not_read_back() -> None:
    """Outputs of scalars only (a delay's ``slept_seconds``): stored as they are, with the
    text the encoder wrote; anything else (a subclass, a string) still goes the full way."""
    from flowbuilder.platform.engine import outputs

    big = 10**30  # a read back would make a new int object
    value = {"n": big, "x": 0.1, "b": False, "z": None}
    fast = outputs._plain_copy(value, 8)
    assert fast is not None
    clean, text, parts = fast
    assert clean == make_storable(value, max_depth=8, repair=True) and json.loads(text) == value
    assert clean["n"] is big  # taken as it is, not parsed again
    assert parts == {key: json.dumps(item) for key, item in value.items()}
    clean, _text, _parts = outputs._plain_copy({"f": _Float(0.25), "s": "x"}, 8)  # type: ignore[misc]
    assert type(clean["f"]) is float and clean == {"f": 0.25, "s": "x"}
    assert outputs._plain_copy({"v": math.inf}, 8) is None
    assert outputs._plain_copy({"k\x00": 1.5}, 8) is None


def test_values_texts_only_for_plain_string_keys() -> None:
    clean, text = storable_outputs_text({"a": [1], "b": "é"}, max_bytes=10**6, max_depth=8)
    assert clean.parts == {"a": "[1]", "b": '"é"'} and text == '{"a":[1],"b":"é"}'
    assert storable_outputs_text({1: "x"}, max_bytes=10**6, max_depth=8)[0].parts is None
    many = {f"k{i}": i for i in range(100)}
    assert storable_outputs_text(many, max_bytes=10**6, max_depth=8)[0].parts is None
    capped, capped_text = storable_outputs_text(
        {"big": "x" * 5000, "small": 1}, max_bytes=1000, max_depth=10
    )
    assert capped.parts is None and capped.text is capped_text
    assert capped == {
        "big": {"_truncated": True, "size_bytes": 5002},
        "small": 1,
        "_truncated": True,
    }
    # The engine wraps the outputs with their text again: the parts stay.
    assert SerialisedJSON(clean, text).parts == clean.parts
    assert SerialisedJSON(clean, text + " ").parts is None


def test_reading_back_leaves_the_collector_as_it_was() -> None:
    from flowbuilder.platform.engine import outputs

    assert gc.isenabled()
    assert outputs._loads('{"a":[1]}') == {"a": [1]} and gc.isenabled()
    gc.disable()
    try:
        assert outputs._loads("[]") == [] and not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        outputs._loads("{")
    assert gc.isenabled()


def test_stored_outputs_read_back_as_the_copy(engine: sa.Engine) -> None:
    """The database (SQLite or PostgreSQL) gives back what the next phase received."""
    table = sa.Table(
        "t_outputs_read_back",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("doc", sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")),
    )
    table.create(engine)
    values = [
        {"q": 'a"b\\', '"\\': "[", "]": "{{", "u": "é😀", "t": (1, 2), 3: None},
        {"k\x00": "\ud800", "n": math.nan},
        {"deep": [[[[{"x": "]]]"}]]]]},
    ]
    try:
        with engine.begin() as conn:
            for i, value in enumerate(values):
                clean, _text = storable_outputs_text(value, max_bytes=10**6, max_depth=8)
                conn.execute(table.insert(), {"id": i, "doc": clean})
                assert (
                    conn.execute(sa.select(table.c.doc).where(table.c.id == i)).scalar_one()
                    == clean
                )
    finally:
        table.drop(engine)


def _inputs(**values: Any) -> SerialisedJSON:
    from flowbuilder.platform.jsonvalues import serialised_object

    parts = {
        key: json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        for key, value in values.items()
    }
    return serialised_object(values, parts)


def test_a_value_passed_on_unchanged_is_kept_not_read_back() -> None:
    data = {"items": [{"id": i, "name": f"é{i}"} for i in range(50)]}
    inputs = _inputs(data=data, seconds=0)
    clean, text = storable_outputs_text(
        {"data": inputs["data"], "extra": [1, 2]}, max_bytes=100_000, max_depth=10, inputs=inputs
    )
    assert clean["data"] is data  # passed on: no second parse
    assert clean == {"data": data, "extra": [1, 2]} and list(clean) == ["data", "extra"]
    assert json.loads(text) == clean and clean.parts["data"] == inputs.parts["data"]
    # What the node made itself is still a copy, read back from the text.
    made = [1, 2]
    clean, _ = storable_outputs_text({"x": made}, max_bytes=1000, max_depth=10, inputs=inputs)
    assert clean["x"] == made and clean["x"] is not made


def test_a_value_changed_in_place_is_not_passed_on_as_it_came() -> None:
    data = {"items": [1, 2, 3]}
    inputs = _inputs(data=data)
    data["items"].append(4)  # the node mutates its input, then returns it
    clean, text = storable_outputs_text({"data": data}, max_bytes=1000, max_depth=10, inputs=inputs)
    assert clean == {"data": {"items": [1, 2, 3, 4]}} and clean["data"] is not data
    assert json.loads(text) == clean
    # An equal object that is not the one handed in is copied too.
    inputs = _inputs(data={"a": 1})
    other = {"a": 1}
    clean, _ = storable_outputs_text({"data": other}, max_bytes=1000, max_depth=10, inputs=inputs)
    assert clean["data"] == other and clean["data"] is not other


def test_what_is_passed_on_beside_bad_values_is_still_checked() -> None:
    inputs = _inputs(data={"ok": True})
    # A new value needing repair beside a passed-on one: the repair still happens.
    clean, text = storable_outputs_text(
        {"data": inputs["data"], "bad": "x\x00", "nan": math.nan},
        max_bytes=1000,
        max_depth=10,
        inputs=inputs,
    )
    assert clean == {"data": {"ok": True}, "bad": "x\ufffd", "nan": None}
    assert json.loads(text) == clean
    # And too deep is still refused.
    deep: Any = 1
    for _ in range(20):
        deep = [deep]
    with pytest.raises(Unstorable):
        storable_outputs_text(
            {"data": inputs["data"], "deep": deep}, max_bytes=10_000, max_depth=10, inputs=inputs
        )


def test_a_type_that_keeps_its_inputs_is_taken_at_its_word(monkeypatch) -> None:
    from flowbuilder.platform.engine import outputs as outputs_module

    data = {"items": list(range(100))}
    inputs = _inputs(data=data)
    dumped: list[Any] = []
    real = outputs_module._dumps

    def counting(value: Any) -> str:
        dumped.append(value)
        return real(value)

    monkeypatch.setattr(outputs_module, "_dumps", counting)
    clean, text = storable_outputs_text(
        {"data": data, "n": 1}, max_bytes=10_000, max_depth=10, inputs=inputs, keeps_inputs=True
    )
    assert clean["data"] is data and json.loads(text) == {"data": data, "n": 1}
    assert all(value is not data for value in dumped)  # its text came with it
    # Without the promise the value is serialised and compared: a change is caught.
    dumped.clear()
    data["items"].append("changed")
    clean, text = storable_outputs_text(
        {"data": data}, max_bytes=10_000, max_depth=10, inputs=inputs
    )
    assert any(value is data for value in dumped)
    assert clean["data"] is not data and json.loads(text)["data"]["items"][-1] == "changed"


def test_only_node_types_that_keep_their_inputs_say_so() -> None:
    """The promise is checked where it is made: the built-in delay, run on inputs it
    passes on, leaves them as they were; no other built-in type makes it."""
    import copy

    from flowbuilder.platform.nodes import get_node_type, node_types
    from flowbuilder.platform.nodes.base import NodeContext, NodeLogger

    promising = {name for name, node_type in node_types().items() if node_type.keeps_inputs}
    assert promising == {"delay"}
    data = {"items": [{"id": 1, "tags": ["a"]}], "nested": {"deep": [1, 2, {"x": None}]}}
    inputs = {"seconds": 0, "data": data}
    before = copy.deepcopy(inputs)
    ctx = NodeContext(
        execution_id=None,
        user_id=None,
        node_id="d",
        credential=None,
        log=NodeLogger(),
        deadline=time.monotonic() + 30,
        cancelled=lambda: False,
    )
    out = get_node_type("delay").invoke(inputs, ctx)
    assert out["data"] is data and inputs == before
