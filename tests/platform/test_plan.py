"""Execution plans: Kahn-level phases, input resolution, (de)serialization, and property
tests throwing random graphs at validate_definition + build_plan."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowbuilder.platform.definitions import (
    EdgeDefinition,
    NodeDefinition,
    WorkflowDefinition,
    validate_definition,
)
from flowbuilder.platform.engine.outputs import storable_outputs_text
from flowbuilder.platform.errors import ValidationFailed
from flowbuilder.platform.jsonvalues import SerialisedJSON, dumps_json
from flowbuilder.platform.nodes import get_node_type, node_types
from flowbuilder.platform.plan import ExecutionPlan, MissingInput, PlanError, build_plan

CRED = uuid.UUID("8f0b6f0e-2a52-4c1e-9a55-0d8e3c1f7a10")


def node(node_id: str, node_type: str, **inputs: Any) -> dict:
    return {"id": node_id, "type": node_type, "inputs": inputs}


def edge(source: str, source_handle: str, target: str, target_handle: str) -> dict:
    return {
        "source": source,
        "sourceHandle": source_handle,
        "target": target,
        "targetHandle": target_handle,
    }


def plan_of(nodes: list, edges: list) -> ExecutionPlan:
    definition = validate_definition(
        {"version": 1, "nodes": nodes, "edges": edges}, owned_credential_ids=None
    )
    return build_plan(definition)


def ids(plan: ExecutionPlan) -> list[list[str]]:
    return [[n.node_id for n in phase] for phase in plan.phases]


def add(node_id: str, **inputs: Any) -> dict:
    return node(node_id, "add_property_to_json", **{"property_path": "p", **inputs})


# --- phases -------------------------------------------------------------------------------


def test_diamond_and_isolated_node() -> None:
    plan = plan_of(
        [
            node("lonely", "delay", seconds=0),
            node("fetch", "http_request", url="https://example.com/"),
            add("left", json={}),
            add("right", json={}),
            add("join"),
        ],
        [
            edge("fetch", "body", "left", "value"),
            edge("fetch", "status", "right", "value"),
            edge("left", "json", "join", "json"),
            edge("right", "json", "join", "value"),
        ],
    )
    assert ids(plan) == [["lonely", "fetch"], ["left", "right"], ["join"]]
    assert [n.node_id for n in plan.nodes] == ["lonely", "fetch", "left", "right", "join"]
    assert [n.number for n in plan.nodes] == [1, 1, 2, 2, 3]
    assert plan.total_credits == 1 + 2 + 1 + 1 + 1
    assert plan.phase_credits(1) == 3
    fetch = plan.node("fetch")
    assert fetch.node_type == "http_request"
    assert fetch.credits == 2
    assert fetch.retryable and fetch.max_retries == 2
    assert fetch.timeout_seconds == get_node_type("http_request").timeout_seconds
    assert fetch.static_inputs == {"url": "https://example.com/"}


def test_phase_is_longest_path_not_first_seen() -> None:
    # a -> b -> c and a -> c: c must wait for b (phase 3), not run in phase 2.
    plan = plan_of(
        [add("c"), add("b"), add("a", json={})],
        [
            edge("a", "json", "b", "json"),
            edge("b", "json", "c", "json"),
            edge("a", "json", "c", "value"),
        ],
    )
    assert ids(plan) == [["a"], ["b"], ["c"]]


def test_order_inside_phase_follows_definition() -> None:
    plan = plan_of([node(n, "delay", seconds=0) for n in ["z", "m", "a"]], [])
    assert ids(plan) == [["z", "m", "a"]]


def test_build_plan_refuses_unvalidated_graphs() -> None:
    nodes = [
        NodeDefinition(id="a", type="add_property_to_json", inputs={"property_path": "p"}),
        NodeDefinition(id="b", type="add_property_to_json", inputs={"property_path": "p"}),
    ]
    loop = [
        EdgeDefinition(source="a", sourceHandle="json", target="b", targetHandle="json"),
        EdgeDefinition(source="b", sourceHandle="json", target="a", targetHandle="json"),
    ]
    with pytest.raises(PlanError, match="cycle"):
        build_plan(WorkflowDefinition(version=1, nodes=nodes, edges=loop))
    unknown = [NodeDefinition(id="a", type="nope")]
    with pytest.raises(PlanError, match="unknown node type"):
        build_plan(WorkflowDefinition(version=1, nodes=unknown, edges=[]))
    dangling = [EdgeDefinition(source="a", sourceHandle="json", target="x", targetHandle="json")]
    with pytest.raises(PlanError, match="unknown node"):
        build_plan(WorkflowDefinition(version=1, nodes=nodes, edges=dangling))


# --- inputs -------------------------------------------------------------------------------


def test_resolve_inputs_merges_defaults_static_and_edges() -> None:
    plan = plan_of(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("extract", "extract_text_from_html", selector="h1", html="<p>static</p>"),
        ],
        [edge("fetch", "body", "extract", "html")],
    )
    assert plan.resolve_inputs("fetch", {}) == {"method": "GET", "url": "https://example.com/"}
    resolved = plan.resolve_inputs("extract", {"fetch": {"body": "<h1>edge</h1>", "status": 200}})
    assert resolved == {"all": False, "selector": "h1", "html": "<h1>edge</h1>"}  # edge wins
    # An optional output missing upstream leaves the static value in place...
    plan2 = plan_of(
        [node("r", "read_property_from_json", json={"a": 1}, property_path="a"), add("w", json={})],
        [edge("r", "value", "w", "value")],
    )
    assert plan2.resolve_inputs("w", {"r": {}}) == {"json": {}, "property_path": "p"}
    # ...but a required one raises, and an upstream that never ran is a bug.
    plan_no_static = plan_of(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("extract", "extract_text_from_html", selector="h1"),
        ],
        [edge("fetch", "body", "extract", "html")],
    )
    with pytest.raises(MissingInput, match="'html'"):
        plan_no_static.resolve_inputs("extract", {"fetch": {"status": 200}})
    with pytest.raises(PlanError, match="has not run"):
        plan.resolve_inputs("extract", {})
    with pytest.raises(PlanError, match="no node"):
        plan.resolve_inputs("ghost", {})


def test_resolve_inputs_copies_values() -> None:
    plan = plan_of(
        [
            node("r", "read_property_from_json", json={"a": [1]}, property_path="a"),
            add("w", json={}),
        ],
        [edge("r", "value", "w", "value")],
    )
    upstream = {"r": {"value": {"deep": [1]}}}
    resolved = plan.resolve_inputs("w", upstream)
    resolved["json"]["mutated"] = True
    resolved["value"]["deep"].append(2)
    assert plan.node("w").static_inputs["json"] == {}
    assert upstream["r"]["value"] == {"deep": [1]}


# --- serialization ------------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    definition = validate_definition(
        {
            "version": 1,
            "nodes": [
                {
                    "id": "fetch",
                    "type": "http_request",
                    "credential_id": str(CRED),
                    "inputs": {"url": "https://example.com/", "headers": {"A": "1"}},
                },
                add("w", json={"x": [1, 2.5, None]}),
            ],
            "edges": [edge("fetch", "body", "w", "value")],
        },
        owned_credential_ids=[CRED],
    )
    plan = build_plan(definition)
    stored = json.loads(json.dumps(plan.to_dict()))
    assert stored["total_credits"] == 3
    loaded = ExecutionPlan.from_dict(stored)
    assert loaded == plan
    assert loaded.node("fetch").credential_id == CRED
    assert loaded.resolve_inputs("w", {"fetch": {"body": "b"}}) == plan.resolve_inputs(
        "w", {"fetch": {"body": "b"}}
    )


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.pop("version"),
        lambda d: d.update(total_credits=999),
        lambda d: d["phases"][0][0].pop("node_id"),
        lambda d: d["phases"].reverse(),  # dependencies would run first
        lambda d: d["phases"][1].append(d["phases"][0][0]),  # a node twice
        lambda d: d["phases"].append([]),
        lambda d: d["phases"][0][0].update(number="x"),
    ],
)
def test_from_dict_refuses_damaged_plans(mangle: Any) -> None:
    plan = plan_of(
        [node("fetch", "http_request", url="https://example.com/"), add("w", json={})],
        [edge("fetch", "body", "w", "value")],
    )
    data = json.loads(json.dumps(plan.to_dict()))
    mangle(data)
    with pytest.raises(PlanError):
        ExecutionPlan.from_dict(data)


# --- properties ---------------------------------------------------------------------------


def check_plan(definition: WorkflowDefinition, plan: ExecutionPlan) -> None:
    """The invariants every plan must satisfy."""
    index = {n.id: i for i, n in enumerate(definition.nodes)}
    number = {p.node_id: p.number for p in plan.nodes}
    assert sorted(number) == sorted(index)  # every node exactly once
    assert len(plan.nodes) == len(definition.nodes)
    preds: dict[str, list[str]] = {n: [] for n in index}
    for e in definition.edges:
        assert number[e.source] < number[e.target]
        preds[e.target].append(e.source)
    for node_id, phase in number.items():  # exactly the Kahn level
        assert phase == 1 + max((number[p] for p in preds[node_id]), default=0)
    for k, phase_nodes in enumerate(plan.phases, start=1):
        assert phase_nodes and all(p.number == k for p in phase_nodes)
        positions = [index[p.node_id] for p in phase_nodes]
        assert positions == sorted(positions)
    assert plan.total_credits == sum(get_node_type(n.type).credits for n in definition.nodes)
    assert plan.total_credits == sum(p.credits for p in plan.nodes)
    assert ExecutionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


TYPES = sorted(node_types())
PORTS = sorted({name for t in node_types().values() for name in [*t.inputs, *t.outputs]})
small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10,
)
# Mostly plausible values per input name (some of them invalid on purpose).
PLAUSIBLE: dict[str, list[Any]] = {
    "url": ["https://example.com/", "https://example.com/x", "http://10.0.0.1/", "nope"],
    "method": ["GET", "POST", "get", "FETCH"],
    "headers": [{}, {"A": "1"}, {"A": "1\n"}],
    "body": [{}, "text", [1]],
    "api_key_header": ["X-Key"],
    "html": ["<p>x</p>"],
    "selector": ["p", "p.x", "p["],
    "all": [True, False],
    "json": [{}, {"p": 1}, "[1]"],
    "property_path": ["p", "a.0", "a..b"],
    "value": [1, "v", None],
    "seconds": [0, 0.5, 10**6, -1],
}


@st.composite
def random_graphs(draw: st.DrawFn) -> dict:
    """Graphs of random shape. "Messy" ones add every kind of defect (unknown types,
    duplicate ids, junk nodes and values, dangling handles); tidy ones only have random
    edges (cycles, type clashes, double-fed inputs, missing inputs), so a good share of
    them is valid and both branches of the property get exercised."""
    messy = draw(st.booleans())
    count = draw(st.integers(min_value=0, max_value=8))
    if messy:
        pool = st.sampled_from(list("abcdefghij")) | st.text(max_size=3)
        ids = draw(st.lists(pool, min_size=count, max_size=count))
        type_pool = st.sampled_from([*TYPES, *TYPES, *TYPES, "unknown_type", ""])
    else:
        ids = draw(st.permutations(list("abcdefghij")))[:count]
        type_pool = st.sampled_from(TYPES)
    types = draw(st.lists(type_pool, min_size=count, max_size=count))
    nodes = []
    for node_id, type_name in zip(ids, types, strict=True):
        known = node_types().get(type_name)
        inputs: dict[str, Any] = {}
        for port, spec in known.inputs.items() if known else []:
            if (spec.required and not messy) or draw(st.integers(0, 3)):
                good = PLAUSIBLE.get(port, [None])
                values = st.sampled_from(good) | small_json if messy else st.just(good[0])
                inputs[port] = draw(values)
        if messy and not draw(st.integers(0, 5)):
            inputs[draw(st.sampled_from(PORTS) | st.text(max_size=4))] = draw(small_json)
        item: dict[str, Any] = {"id": node_id, "type": type_name, "inputs": inputs}
        if (messy or (known and known.credential != "none")) and not draw(st.integers(0, 4)):
            item["credential_id"] = draw(
                st.sampled_from([str(CRED), str(uuid.UUID(int=1)), "x"])
                if messy
                else st.just(str(CRED))
            )
        if not draw(st.integers(0, 4)):
            item["position"] = draw(small_json)
        if messy and not draw(st.integers(0, 10)):
            item = draw(small_json)  # junk instead of a node
        nodes.append(item)
    edges = []
    ends = [*ids, "ghost"] if messy or not ids else ids
    for _ in range(draw(st.integers(min_value=0, max_value=10 if messy else count))):
        source = draw(st.sampled_from(ends))
        target = draw(st.sampled_from(ends))
        if not messy and ids.index(source) > ids.index(target) and draw(st.integers(0, 4)):
            source, target = target, source  # mostly forward: cycles stay possible, not certain
        source_type = node_types().get(types[ids.index(source)]) if source in ids else None
        target_type = node_types().get(types[ids.index(target)]) if target in ids else None
        outs = sorted(source_type.outputs) if source_type else PORTS
        ins = sorted(target_type.inputs) if target_type else PORTS
        edges.append(
            {
                "source": source,
                "sourceHandle": draw(st.sampled_from(outs) | st.sampled_from(PORTS))
                if messy
                else draw(st.sampled_from(outs)),
                "target": target,
                "targetHandle": draw(st.sampled_from(ins) | st.sampled_from(PORTS))
                if messy
                else draw(st.sampled_from(ins)),
            }
        )
    version = draw(st.just(1) | small_json) if messy else 1
    return {"version": version, "nodes": nodes, "edges": edges}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_random_graphs_fail_cleanly_or_plan_correctly(raw: dict) -> None:
    try:
        definition = validate_definition(raw, owned_credential_ids=[CRED])
    except ValidationFailed as exc:
        assert exc.problems and all(p.code and isinstance(p.path, str) for p in exc.problems)
        return
    check_plan(definition, build_plan(definition))


# Node kinds for DAGs that must validate: (type, static inputs, {input: accepted outputs}).
_ANY_OUTPUT = None
KINDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "delay": ({"seconds": 0}, {"seconds": {"slept_seconds", "value"}}),
    "add_property_to_json": (
        {"json": {}, "property_path": "p"},
        {"json": _ANY_OUTPUT, "value": _ANY_OUTPUT},
    ),
    "read_property_from_json": (
        {"json": {"p": 1}, "property_path": "p"},
        {"json": _ANY_OUTPUT},
    ),
}
OUTPUTS = {
    "delay": ["slept_seconds"],
    "add_property_to_json": ["json"],
    "read_property_from_json": ["value"],
}  # noqa: E501


@st.composite
def valid_dags(draw: st.DrawFn) -> dict:
    count = draw(st.integers(min_value=1, max_value=12))
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=count, max_size=count))
    # rank = topological position; definition order is a shuffle of it.
    names = draw(st.permutations([f"n{i}" for i in range(count)]))
    nodes = [node(names[i], kinds[i], **KINDS[kinds[i]][0]) for i in range(count)]
    edges = []
    for target in range(1, count):
        for port, accepted in KINDS[kinds[target]][1].items():
            if not draw(st.booleans()):
                continue
            sources = [
                (s, OUTPUTS[kinds[s]][0])
                for s in range(target)
                if accepted is None or OUTPUTS[kinds[s]][0] in accepted
            ]
            if sources:
                s, handle = draw(st.sampled_from(sources))
                edges.append(edge(names[s], handle, names[target], port))
    order = draw(st.permutations(range(count)))
    return {"version": 1, "nodes": [nodes[i] for i in order], "edges": draw(st.permutations(edges))}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_dags())
def test_valid_dags_always_plan(raw: dict) -> None:
    definition = validate_definition(raw, owned_credential_ids=[])
    plan = build_plan(definition)
    check_plan(definition, plan)
    # Feeding every node the outputs of everything before it resolves all inputs.
    outputs: dict[str, dict[str, Any]] = {}
    for planned in plan.nodes:
        resolved = plan.resolve_inputs(planned.node_id, outputs)
        assert set(planned.static_inputs) <= set(resolved)
        outputs[planned.node_id] = {h: 1 for h in OUTPUTS[planned.node_type]}


def test_resolve_inputs_hands_over_an_output_only_one_input_reads() -> None:
    """The engine's mode: a value read by one input alone is not copied; one read by two
    inputs still is, so neither reader sees what the other does to it."""
    plan = plan_of(
        [
            node("r", "read_property_from_json", json={"a": [1]}, property_path="a"),
            add("w", json={}),
            add("x", json={}),
            node("s", "read_property_from_json", json={"a": [1]}, property_path="a"),
            add("y", json={}),
        ],
        [edge("r", "value", "w", "value"), edge("r", "value", "x", "value")]
        + [edge("s", "value", "y", "value")],
    )
    upstream = {"r": {"value": {"deep": [1]}}, "s": {"value": {"deep": [1]}}}
    sole = plan.resolve_inputs("y", upstream, hand_over_sole=True)
    assert sole["value"] is upstream["s"]["value"]
    assert plan.resolve_inputs("y", upstream)["value"] is not upstream["s"]["value"]
    shared = plan.resolve_inputs("w", upstream, hand_over_sole=True)
    shared["value"]["deep"].append(2)
    assert plan.resolve_inputs("x", upstream, hand_over_sole=True)["value"] == {"deep": [1]}
    assert shared["json"] is not plan.node("w").static_inputs["json"]


# --- inputs with their stored text ----------------------------------------------------------


def _stored(outputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs as the engine keeps them: made storable at the node boundary."""
    return storable_outputs_text(outputs, max_bytes=10**6, max_depth=64)[0]


def _check_text(resolved: dict[str, Any], plain: dict[str, Any]) -> None:
    assert type(resolved) is SerialisedJSON and resolved == plain
    assert json.loads(resolved.text) == json.loads(json.dumps(plain)) == resolved
    assert dumps_json(resolved) is resolved.text  # what the database is sent
    resolved.text.encode()  # UTF-8: no lone surrogate
    assert "\\u0000" not in resolved.text.replace("\\\\", "")


def test_serialised_inputs_reuse_the_upstream_outputs_text() -> None:
    plan = plan_of(
        [
            node("fetch", "http_request", url="https://example.com/"),
            node("extract", "extract_text_from_html", selector="h1", html="<p>static</p>"),
        ],
        [edge("fetch", "body", "extract", "html")],
    )
    upstream = _stored({"body": '<h1>é \x00 \ud800 ["]</h1>', "status": 200})
    resolved = plan.resolve_inputs("extract", {"fetch": upstream}, serialised=True)
    _check_text(resolved, plan.resolve_inputs("extract", {"fetch": upstream}))
    assert resolved["html"] == '<h1>é \ufffd \ufffd\ufffd\ufffd ["]</h1>'  # edge wins
    assert resolved.parts["html"] is upstream.parts["body"]  # reused, not serialised again
    # The text is the upstream's: proof that it is what gets stored.
    forged = SerialisedJSON({"body": "x"}, '{"body":"y"}', {"body": '"y"'})
    assert (
        json.loads(plan.resolve_inputs("extract", {"fetch": forged}, serialised=True).text)["html"]
        == "y"
    )
    # Outputs read back from the database (a resumed run) have no texts: serialised here.
    plain_upstream = {"body": "<h1>b</h1>"}
    _check_text(plan.resolve_inputs("fetch", {}, serialised=True), plan.resolve_inputs("fetch", {}))
    _check_text(
        plan.resolve_inputs("extract", {"fetch": plain_upstream}, serialised=True),
        {"all": False, "selector": "h1", "html": "<h1>b</h1>"},
    )


def test_serialised_inputs_when_an_output_is_missing_or_shared() -> None:
    plan = plan_of(
        [
            node("r", "read_property_from_json", json={"a": 1}, property_path="a"),
            add("w", json={"static": True}),
            add("x", json={}),
        ],
        [edge("r", "value", "w", "value"), edge("r", "value", "x", "value")],
    )
    # An optional output missing upstream: the static and default values, dumped here.
    resolved = plan.resolve_inputs("w", {"r": _stored({})}, serialised=True)
    _check_text(resolved, {"json": {"static": True}, "property_path": "p"})
    # Read by two inputs: each gets a copy, both with the upstream's text.
    upstream = _stored({"value": {"deep": [1, "é"]}})
    first = plan.resolve_inputs("w", {"r": upstream}, hand_over_sole=True, serialised=True)
    second = plan.resolve_inputs("x", {"r": upstream}, hand_over_sole=True, serialised=True)
    assert first["value"] is not second["value"]
    for node_id, resolved in (("w", first), ("x", second)):
        _check_text(resolved, plan.resolve_inputs(node_id, {"r": upstream}))
    first["value"]["deep"].append(2)
    assert json.loads(second.text)["value"] == {"deep": [1, "é"]} == upstream["value"]


_trap_strings = st.lists(
    st.sampled_from(['"', "\\", "[", "}", "\x00", "\ud800", "é", "😀", "a"]), max_size=5
).map("".join)
_output_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _trap_strings),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.one_of(_trap_strings, st.integers()), children, max_size=3),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["value", "other"]), _output_values, max_size=2))
def test_serialised_inputs_are_the_inputs_text(outputs: dict[str, Any]) -> None:
    """Whatever a node returned, the text stored for the next node's inputs reads back
    as the inputs that node receives: NUL, lone surrogates and NaN cannot appear."""
    plan = plan_of(
        [
            node("r", "read_property_from_json", json={"a": 1}, property_path="a"),
            add("w", json={"static": "é"}),
        ],
        [edge("r", "value", "w", "value")],
    )
    upstream = _stored(outputs)
    resolved = plan.resolve_inputs("w", {"r": upstream}, hand_over_sole=True, serialised=True)
    _check_text(resolved, plan.resolve_inputs("w", {"r": upstream}))
    if "value" in outputs:
        assert resolved["value"] == json.loads(upstream.text)["value"]
