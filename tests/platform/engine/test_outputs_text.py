"""Node outputs are serialised once: the text made at the node boundary is what the
database stores; the iterative check keeps its repairs on the fast path."""

from __future__ import annotations

import enum
import json
import math

import pytest
import sqlalchemy as sa

from flowbuilder.platform.engine.outputs import Unstorable, storable_outputs, storable_outputs_text
from flowbuilder.platform.jsonvalues import SerialisedJSON, dumps_json, make_storable


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
