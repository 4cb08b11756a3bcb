"""Definition parsing and validation: every problem code with its path, the React Flow
shape, the JSON Schema, and a property test that no input escapes as another exception."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbuilder.platform.definitions import (
    DefinitionProblem,
    WorkflowDefinition,
    definition_json_schema,
    validate_definition,
)
from flowbuilder.platform.errors import ValidationFailed
from flowbuilder.platform.nodes import NodeType, PortSpec, register_node_type, unregister_node_type
from flowbuilder.platform.settings import override_settings

CRED = uuid.UUID("8f0b6f0e-2a52-4c1e-9a55-0d8e3c1f7a10")
OTHER_CRED = uuid.UUID("00000000-0000-4000-8000-000000000001")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "definition-format.md"


def node(node_id: str, node_type: str, credential_id: Any = None, **inputs: Any) -> dict:
    data: dict[str, Any] = {"id": node_id, "type": node_type, "inputs": inputs}
    if credential_id is not None:
        data["credential_id"] = str(credential_id)
    return data


def edge(source: str, source_handle: str, target: str, target_handle: str, **extra: Any) -> dict:
    return {
        "source": source,
        "sourceHandle": source_handle,
        "target": target,
        "targetHandle": target_handle,
        **extra,
    }


def doc(nodes: list, edges: list | None = None, **extra: Any) -> dict:
    return {"version": 1, "nodes": nodes, "edges": edges or [], **extra}


def fetch_and_extract() -> dict:
    return doc(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("extract", "extract_text_from_html", selector="h1"),
        ],
        [edge("fetch", "body", "extract", "html", id="e1")],
    )


def problems(raw: Any, owned: Any = None) -> list[DefinitionProblem]:
    with pytest.raises(ValidationFailed) as info:
        validate_definition(raw, owned_credential_ids=owned)
    found = info.value.problems
    assert found, "ValidationFailed without problems"
    assert all(isinstance(p, DefinitionProblem) for p in found)
    return found


def assert_problem(raw: Any, code: str, path: str, owned: Any = None) -> DefinitionProblem:
    found = problems(raw, owned)
    matching = [p for p in found if p.code == code and p.path == path]
    assert matching, f"no {code} at {path!r}; got {[(p.code, p.path) for p in found]}"
    return matching[0]


@pytest.fixture
def credential_node_type() -> Iterator[NodeType]:
    node_type = register_node_type(
        NodeType(
            type="test_needs_credential",
            credential="required",
            inputs={"x": PortSpec("string")},
            outputs={"y": PortSpec("string")},
            run=lambda inputs, ctx: {"y": "ok"},
        )
    )
    yield node_type
    unregister_node_type(node_type.type)


# --- valid definitions --------------------------------------------------------------------


def test_valid_definition_parses() -> None:
    definition = validate_definition(fetch_and_extract(), owned_credential_ids=[])
    assert isinstance(definition, WorkflowDefinition)
    assert [n.id for n in definition.nodes] == ["fetch", "extract"]
    assert definition.edges[0].source_handle == "body"
    assert definition.node("extract").inputs == {"selector": "h1"}
    assert definition.to_dict()["edges"][0]["targetHandle"] == "html"


def test_text_and_bytes_input() -> None:
    text = json.dumps(fetch_and_extract())
    assert len(validate_definition(text, owned_credential_ids=None).nodes) == 2
    assert len(validate_definition(text.encode(), owned_credential_ids=None).nodes) == 2


def test_react_flow_shape_is_accepted() -> None:
    raw = {
        "version": 1,
        "nodes": [
            {
                "id": "fetch",
                "type": "http_request",
                "position": {"x": 10, "y": 20.5},
                "data": {"inputs": {"url": "https://example.com/"}, "credential_id": str(CRED)},
                "width": 150,
                "selected": True,
            },
            {"id": "wait", "type": "delay", "position": "nonsense", "data": {"inputs": {}}},
        ],
        "edges": [edge("fetch", "status", "wait", "seconds", id="e1", animated=True)],
        "viewport": {"x": 0, "y": 0, "zoom": 1},
    }
    definition = validate_definition(raw, owned_credential_ids=[CRED])
    fetch = definition.node("fetch")
    assert fetch.inputs == {"url": "https://example.com/"}
    assert fetch.credential_id == CRED
    assert fetch.position == {"x": 10.0, "y": 20.5}
    assert definition.node("wait").position is None


def test_required_input_satisfied_by_edge_or_default() -> None:
    # extract's html comes from the edge; method has a default; integer -> number is fine.
    raw = doc(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("wait", "delay"),
        ],
        [edge("fetch", "status", "wait", "seconds")],
    )
    validate_definition(raw, owned_credential_ids=None)


def test_null_inputs_count_as_unset() -> None:
    raw = doc([node("fetch", "http_request", url=None)])
    assert_problem(raw, "missing_input", "nodes[0].inputs.url")
    raw = doc([node("fetch", "http_request", url="https://example.com/", headers=None)])
    validate_definition(raw, owned_credential_ids=None)


def test_docs_example_is_valid() -> None:
    text = DOCS.read_text()
    example = re.search(r"```json\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    definition = validate_definition(example, owned_credential_ids=[CRED])
    assert len(definition.nodes) == 4


# --- every problem code, with its path -----------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["{not json", b"\xff\xfe\x00", '{"version": NaN}', '{"n": 1e999}', '{"n": ' + "9" * 5000 + "}"],
)
def test_invalid_json(raw: Any) -> None:
    assert_problem(raw, "invalid_json", "")


def test_invalid_json_for_non_serializable_dict() -> None:
    assert_problem(doc([node("a", "delay", seconds={1, 2})]), "invalid_json", "")
    assert_problem(doc([node("a", "delay", seconds=float("nan"))]), "invalid_json", "")


def test_too_large_is_checked_before_parsing() -> None:
    with override_settings(MAX_DEFINITION_BYTES=1024):
        found = problems("x" * 1025)  # not even JSON: the size check comes first
        assert [(p.code, p.path) for p in found] == [("too_large", "")]
        assert_problem(b"{" + b" " * 2000 + b"}", "too_large", "")
        assert_problem("é" * 600, "too_large", "")  # 600 characters, 1200 bytes
        big = doc([node("a", "http_request", url="https://example.com/" + "a" * 1100)])
        assert_problem(big, "too_large", "")
        validate_definition(fetch_and_extract(), owned_credential_ids=None)


def test_too_many_nodes() -> None:
    raw = doc([node(f"n{i}", "delay", seconds=1) for i in range(3)])
    with override_settings(MAX_DEFINITION_NODES=2):
        found = problems(raw)
        assert [(p.code, p.path) for p in found] == [("too_many_nodes", "nodes")]
    with override_settings(MAX_DEFINITION_NODES=3):
        validate_definition(raw, owned_credential_ids=None)


def test_too_deep() -> None:
    value: Any = "leaf"
    for _ in range(70):
        value = {"k": value}
    raw = doc([node("a", "add_property_to_json", json=value, property_path="x")])
    assert_problem(raw, "too_deep", "nodes[0].inputs.json")


@pytest.mark.parametrize("version", [2, "1", True, None, [1], 0])
def test_unsupported_version(version: Any) -> None:
    raw = fetch_and_extract()
    raw["version"] = version
    assert_problem(raw, "unsupported_version", "version")


def test_missing_version() -> None:
    raw = fetch_and_extract()
    del raw["version"]
    assert_problem(raw, "unsupported_version", "version")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([1, 2], ""),
        ("[]", ""),
        ('"text"', ""),
        (42, ""),
        (None, ""),
        ({"version": 1, "nodes": {"a": 1}}, "nodes"),
        ({"version": 1, "nodes": [], "edges": "x"}, "edges"),
        (doc([node("a", "delay", seconds=1), 7]), "nodes[1]"),
        (doc([{"id": 5, "type": "delay", "inputs": {"seconds": 1}}]), "nodes[0].id"),
        (doc([{"id": "a", "type": "delay", "inputs": [1]}]), "nodes[0].inputs"),
        (doc([node("a", "delay", seconds="ten")]), "nodes[0].inputs.seconds"),
        (doc([node("a", "delay", seconds=True)]), "nodes[0].inputs.seconds"),
        (doc([node("a", "extract_text_from_html", html=3, selector="p")]), "nodes[0].inputs.html"),
        (doc([node("a", "delay", seconds=1)], [5]), "edges[0]"),
    ],
)
def test_wrong_type(raw: Any, path: str) -> None:
    assert_problem(raw, "wrong_type", path)


def test_wrong_type_between_ports() -> None:
    raw = doc(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("wait", "delay"),
        ],
        [edge("fetch", "url", "wait", "seconds")],  # string -> number
    )
    found = assert_problem(raw, "wrong_type", "edges[0]")
    assert "string" in found.message and "number" in found.message


def test_missing_field() -> None:
    raw = doc(
        [{"id": "a", "inputs": {}}, node("b", "delay", seconds=1)],
        [{"source": "b", "sourceHandle": "slept_seconds", "target": "a"}],
    )
    found = problems(raw)
    paths = {(p.code, p.path) for p in found}
    assert ("missing_field", "nodes[0].type") in paths
    assert ("missing_field", "edges[0].targetHandle") in paths
    assert_problem({"version": 1}, "missing_field", "nodes")


@pytest.mark.parametrize(
    ("bad_node", "path"),
    [
        (
            node("a", "extract_text_from_html", html="<p>", selector="p["),
            "nodes[0].inputs.selector",
        ),
        (node("a", "delay", seconds=10_000), "nodes[0].inputs.seconds"),
        (node("a", "delay", seconds=-1), "nodes[0].inputs.seconds"),
        (
            node("a", "http_request", url="https://x.example/", method="FETCH"),
            "nodes[0].inputs.method",
        ),
        (node("a", "http_request", url="not a url at all"), "nodes[0].inputs.url"),
        (
            node("a", "http_request", url="https://x.example/", headers={"A": "1\n2"}),
            "nodes[0].inputs.headers",
        ),
        (
            node("a", "read_property_from_json", json={}, property_path="a..b"),
            "nodes[0].inputs.property_path",
        ),
        (
            {"id": "a", "type": "http_request", "inputs": {}, "credential_id": "not-a-uuid"},
            "nodes[0].credential_id",
        ),
        ({"id": "", "type": "delay", "inputs": {"seconds": 1}}, "nodes[0].id"),
    ],
)
def test_invalid_value(bad_node: dict, path: str) -> None:
    assert_problem(doc([bad_node]), "invalid_value", path)


def test_delay_limit_follows_setting() -> None:
    raw = doc([node("a", "delay", seconds=5)])
    with override_settings(MAX_DELAY_SECONDS=2):
        assert_problem(raw, "invalid_value", "nodes[0].inputs.seconds")
    validate_definition(raw, owned_credential_ids=None)


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/", "http://169.254.169.254/", "ftp://example.com/", "http://u:p@x.example/"],
)
def test_blocked_url(url: str) -> None:
    assert_problem(doc([node("a", "http_request", url=url)]), "blocked_url", "nodes[0].inputs.url")
    raw = doc([node("a", "deliver_via_webhook", url=url, body={})])
    assert_problem(raw, "blocked_url", "nodes[0].inputs.url")


def test_duplicate_node_id_still_checks_the_duplicate() -> None:
    raw = doc([node("a", "delay", seconds=1), node("a", "delay", seconds="x")])
    found = problems(raw)
    assert {(p.code, p.path) for p in found} == {
        ("duplicate_node_id", "nodes[1].id"),
        ("wrong_type", "nodes[1].inputs.seconds"),
    }


def test_duplicate_edge_id() -> None:
    raw = doc(
        [node("a", "delay", seconds=1), node("b", "delay"), node("c", "delay")],
        [
            edge("a", "slept_seconds", "b", "seconds", id="e"),
            edge("a", "slept_seconds", "c", "seconds", id="e"),
        ],
    )
    assert_problem(raw, "duplicate_edge_id", "edges[1].id")


def test_unknown_node_type() -> None:
    raw = doc([node("a", "delay", seconds=1), node("b", "teleport")], [])
    found = assert_problem(raw, "unknown_node_type", "nodes[1].type")
    assert "teleport" in found.message


def test_unknown_input() -> None:
    raw = doc([{"id": "a", "type": "delay", "inputs": {"seconds": 1, "bogus": 2, "a.b": 3}}])
    assert_problem(raw, "unknown_input", "nodes[0].inputs.bogus")
    assert_problem(raw, "unknown_input", 'nodes[0].inputs["a.b"]')


def test_missing_input() -> None:
    raw = doc(
        [
            node("fetch", "http_request", method="GET"),
            node("extract", "extract_text_from_html", selector="h1"),
        ]
    )
    found = problems(raw)
    assert {(p.code, p.path) for p in found} == {
        ("missing_input", "nodes[0].inputs.url"),
        ("missing_input", "nodes[1].inputs.html"),
    }


@pytest.mark.parametrize(
    ("bad_edge", "path"),
    [
        (edge("ghost", "body", "extract", "html"), "edges[0].source"),
        (edge("fetch", "body", "ghost", "html"), "edges[0].target"),
        (edge("fetch", "nonexistent", "extract", "html"), "edges[0].sourceHandle"),
        (edge("fetch", "body", "extract", "nonexistent"), "edges[0].targetHandle"),
        (
            edge("fetch", "body", "extract", "selector") | {"targetHandle": "zzz"},
            "edges[0].targetHandle",
        ),
    ],
)
def test_dangling_edge(bad_edge: dict, path: str) -> None:
    raw = fetch_and_extract()
    raw["edges"] = [bad_edge]
    assert_problem(raw, "dangling_edge", path)


def test_edge_to_node_that_failed_to_parse_is_not_dangling() -> None:
    raw = fetch_and_extract()
    raw["nodes"][1]["inputs"] = "oops"
    found = problems(raw)
    assert {(p.code, p.path) for p in found} == {("wrong_type", "nodes[1].inputs")}


def test_multiple_edges_to_input() -> None:
    raw = doc(
        [node("a", "delay", seconds=1), node("b", "delay", seconds=1), node("c", "delay")],
        [edge("a", "slept_seconds", "c", "seconds"), edge("b", "slept_seconds", "c", "seconds")],
    )
    assert_problem(raw, "multiple_edges_to_input", "edges[1].targetHandle")


def test_cycle() -> None:
    raw = doc(
        [
            node("start", "delay", seconds=1),
            node("x", "add_property_to_json", json={}, property_path="p"),
            node("y", "add_property_to_json", property_path="p"),
            node("z", "add_property_to_json", property_path="p"),
        ],
        [
            edge("start", "slept_seconds", "x", "value"),
            edge("x", "json", "y", "json"),
            edge("y", "json", "z", "json"),
            edge("z", "json", "y", "value"),
        ],
    )
    found = assert_problem(raw, "cycle", "nodes[2]")
    assert "'y', 'z'" in found.message
    assert [p.code for p in found_problems(raw)] == ["cycle"]


def found_problems(raw: Any) -> list[DefinitionProblem]:
    return problems(raw)


def test_self_loop_and_two_separate_cycles() -> None:
    raw = doc(
        [
            node("s", "delay", seconds=1),
            node("a", "add_property_to_json", json={}, property_path="p"),
            node("b", "add_property_to_json", property_path="p"),
            node("c", "add_property_to_json", property_path="p"),
            node("d", "add_property_to_json", property_path="p"),
        ],
        [
            edge("s", "slept_seconds", "a", "value"),
            edge("a", "json", "a", "value", id="self"),
            edge("s", "slept_seconds", "c", "value"),
            edge("c", "json", "b", "value"),
            edge("b", "json", "c", "json"),
            edge("b", "json", "d", "json"),
        ],
    )
    found = problems(raw)
    cycles = sorted((p.path, p.message) for p in found if p.code == "cycle")
    assert [path for path, _ in cycles] == ["nodes[1]", "nodes[2]"]  # d is downstream only
    assert "feeds itself" in cycles[0][1]


def test_no_entry_point() -> None:
    assert_problem(doc([]), "no_entry_point", "nodes")
    raw = doc(
        [
            node("a", "add_property_to_json", property_path="p"),
            node("b", "add_property_to_json", property_path="p"),
        ],
        [edge("a", "json", "b", "json"), edge("b", "json", "a", "json")],
    )
    found = problems(raw)
    assert {(p.code, p.path) for p in found} == {("no_entry_point", "nodes"), ("cycle", "nodes[0]")}


def test_credentials(credential_node_type: NodeType) -> None:
    needs = doc([node("a", "test_needs_credential")])
    assert_problem(needs, "credential_required", "nodes[0].credential_id")
    assert_problem(needs, "credential_required", "nodes[0].credential_id", owned=None)
    with_cred = doc([node("a", "test_needs_credential", credential_id=CRED)])
    validate_definition(with_cred, owned_credential_ids=[CRED])
    validate_definition(with_cred, owned_credential_ids=None)  # ownership check skipped
    validate_definition(with_cred, owned_credential_ids={str(CRED)})  # strings are fine too
    assert_problem(with_cred, "credential_not_owned", "nodes[0].credential_id", owned=[OTHER_CRED])
    assert_problem(with_cred, "credential_not_owned", "nodes[0].credential_id", owned=[])


def test_credential_not_owned_on_optional_type() -> None:
    raw = doc([node("a", "http_request", credential_id=CRED, url="https://example.com/")])
    validate_definition(raw, owned_credential_ids=[CRED])
    assert_problem(raw, "credential_not_owned", "nodes[0].credential_id", owned=[OTHER_CRED])


def test_credential_not_allowed() -> None:
    raw = doc([node("a", "delay", credential_id=CRED, seconds=1)])
    assert_problem(raw, "credential_not_allowed", "nodes[0].credential_id", owned=[CRED])


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "version": 3,
        "nodes": [
            node("fetch", "http_request"),
            node("fetch", "delay", seconds=1),
            node("x", "nope"),
            node("h", "extract_text_from_html", html="<p>", selector="p", extra=1),
        ],
        "edges": [edge("fetch", "body", "missing", "html")],
    }
    found = problems(raw)
    assert {(p.code, p.path) for p in found} == {
        ("unsupported_version", "version"),
        ("duplicate_node_id", "nodes[1].id"),
        ("unknown_node_type", "nodes[2].type"),
        ("unknown_input", "nodes[3].inputs.extra"),
        ("dangling_edge", "edges[0].target"),
        ("missing_input", "nodes[0].inputs.url"),
    }


def test_problem_format_and_exception_message() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_definition(doc([node("a", "nope")]), owned_credential_ids=None)
    problem = info.value.problems[0]
    assert str(problem) == f"nodes[0].type: {problem.message}"
    assert problem.to_dict() == {
        "path": "nodes[0].type",
        "code": "unknown_node_type",
        "message": problem.message,
    }
    assert str(info.value).startswith("invalid workflow definition: nodes[0].type: ")
    assert str(DefinitionProblem("", "invalid_json", "broken")) == "broken"


def test_plugin_static_check_that_crashes_becomes_a_problem() -> None:
    class Crashy(NodeType):
        type = "test_crashy"
        inputs = {"x": PortSpec("string")}

        def check_static_inputs(self, static_inputs: Any) -> list:
            raise RuntimeError("bug")

    register_node_type(Crashy())
    try:
        assert_problem(doc([node("a", "test_crashy", x="1")]), "invalid_value", "nodes[0].inputs")
    finally:
        unregister_node_type("test_crashy")


# --- JSON Schema ------------------------------------------------------------------------


def test_json_schema_export() -> None:
    schema = definition_json_schema()
    json.dumps(schema)  # JSON-friendly
    assert schema["properties"]["version"]["const"] == 1
    assert {"http_request", "delay"} <= set(schema["x-node-types"])
    assert schema["x-node-types"]["http_request"]["credits"] == 2
    node_schema = schema["$defs"]["NodeDefinition"]
    assert set(node_schema["required"]) == {"id", "type"}
    rule = next(
        r for r in node_schema["allOf"] if r["if"]["properties"]["type"]["const"] == "delay"
    )
    assert rule["then"]["properties"]["inputs"]["properties"]["seconds"]["type"] == [
        "number",
        "null",
    ]
    assert schema["$defs"]["EdgeDefinition"]["required"] == [
        "source",
        "sourceHandle",
        "target",
        "targetHandle",
    ]


def test_json_schema_agrees_with_validator_on_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(definition_json_schema())
    assert not list(validator.iter_errors(fetch_and_extract()))
    example = json.loads(re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S).group(1))  # type: ignore[union-attr]
    assert not list(validator.iter_errors(example))
    bad = doc([node("a", "delay", seconds="ten")])
    assert list(validator.iter_errors(bad))
    bad = doc([node("a", "delay", seconds=1, bogus=1)])
    assert list(validator.iter_errors(bad))


# --- anything at all ------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["http_request", "delay", "https://example.com/", "h1", str(CRED)]),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                ["version", "nodes", "edges", "id", "type", "inputs", "source", "target"]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=40,
)


def _check_any(raw: Any) -> None:
    try:
        definition = validate_definition(raw, owned_credential_ids=[CRED])
    except ValidationFailed as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem.path, str) and problem.code and problem.message
    else:
        assert isinstance(definition, WorkflowDefinition)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_never_escapes(raw: Any) -> None:
    _check_any(raw)
    try:
        text = json.dumps(raw)
    except ValueError:
        return
    _check_any(text)
    _check_any(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_text_never_escapes(raw: str | bytes) -> None:
    _check_any(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"version": st.just(1), "nodes": st.lists(json_values, max_size=4)},
        optional={"edges": st.lists(json_values, max_size=4)},
    )
)
def test_random_node_shapes_never_escape(raw: dict) -> None:
    _check_any(raw)
