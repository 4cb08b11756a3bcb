"""Workflow definitions: the versioned JSON format, its JSON Schema, and the validator.

The format (documented in ``docs/definition-format.md``) is close to what React Flow
front ends save::

    {"version": 1,
     "nodes": [{"id": "fetch", "type": "http_request", "position": {"x": 0, "y": 0},
                "inputs": {"url": "https://example.com", "method": "GET"},
                "credential_id": null}],
     "edges": [{"id": "e1", "source": "fetch", "sourceHandle": "body",
                "target": "extract", "targetHandle": "html"}]}

React Flow's nesting ``"data": {"inputs": ..., "credential_id": ...}`` is accepted too.

:func:`validate_definition` is the one entry point: it needs no database, no worker and
no network, reports every problem at once (each with a path such as
``nodes[2].inputs.url``), and turns any input whatsoever into either a
:class:`WorkflowDefinition` or :class:`ValidationFailed`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from flowbuilder.platform.errors import ValidationFailed
from flowbuilder.platform.jsonvalues import MAX_DOCUMENT_DEPTH, Unstorable, make_storable
from flowbuilder.platform.nodes import NodeType, find_node_type, node_types
from flowbuilder.platform.nodes.base import describe_type, types_compatible, value_matches
from flowbuilder.platform.settings import get_settings

logger = structlog.get_logger(__name__)

CURRENT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_ID_LENGTH = 200
# Node ids and node types are stored per phase (ExecutionPhase.node_id and .node_type,
# 100 characters): a longer id would validate and then never run.
MAX_NODE_ID_LENGTH = 100
# Static input values nest at most this deep (pydantic refuses to serialize past ~250).
MAX_INPUT_DEPTH = 64


def _printable(value: str) -> str:
    """Ids and names end up in columns, logs and URLs: no control characters (NUL
    included, which PostgreSQL cannot store at all)."""
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise ValueError("must not contain control characters")
    return value


NodeId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NODE_ID_LENGTH),
    AfterValidator(_printable),
]
HandleName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(_printable)
]

# Problem codes (see docs/definition-format.md).
INVALID_JSON = "invalid_json"
TOO_LARGE = "too_large"
TOO_MANY_NODES = "too_many_nodes"
TOO_DEEP = "too_deep"
UNSUPPORTED_VERSION = "unsupported_version"
WRONG_TYPE = "wrong_type"
MISSING_FIELD = "missing_field"
INVALID_VALUE = "invalid_value"
DUPLICATE_NODE_ID = "duplicate_node_id"
DUPLICATE_EDGE_ID = "duplicate_edge_id"
UNKNOWN_NODE_TYPE = "unknown_node_type"
UNKNOWN_INPUT = "unknown_input"
MISSING_INPUT = "missing_input"
DANGLING_EDGE = "dangling_edge"
MULTIPLE_EDGES_TO_INPUT = "multiple_edges_to_input"
CYCLE = "cycle"
NO_ENTRY_POINT = "no_entry_point"
CREDENTIAL_REQUIRED = "credential_required"
CREDENTIAL_NOT_ALLOWED = "credential_not_allowed"
CREDENTIAL_NOT_OWNED = "credential_not_owned"


@dataclass(frozen=True, slots=True)
class DefinitionProblem:
    """One thing wrong with a definition. ``path`` is empty for the document itself."""

    path: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "code": self.code, "message": self.message}


# --- models -----------------------------------------------------------------------------


class NodeDefinition(BaseModel):
    """One node. ``position`` is kept for the editor and ignored by the engine."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: NodeId = Field(description="unique within the workflow; edges refer to it")
    type: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NODE_ID_LENGTH)] = Field(
        description="a registered node type, e.g. http_request"
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="static input values by input name"
    )
    credential_id: uuid.UUID | None = Field(
        default=None, description="a credential of the workflow's owner"
    )
    position: dict[str, float] | None = Field(default=None, description="ignored (editor only)")

    @model_validator(mode="before")
    @classmethod
    def _react_flow_shape(cls, value: Any) -> Any:
        """Accept React Flow's ``data`` nesting, and drop a malformed ``position``."""
        if not isinstance(value, dict):
            return value
        data = value.get("data")
        position = value.get("position")
        if isinstance(data, dict) or "position" in value:
            value = dict(value)
        if isinstance(data, dict):
            for key in ("inputs", "credential_id"):
                if key not in value and key in data:
                    value[key] = data[key]
        if "position" in value:
            cleaned = _clean_position(position)
            if cleaned is None:
                value.pop("position")
            else:
                value["position"] = cleaned
        return value


def _clean_position(position: Any) -> dict[str, float] | None:
    if not isinstance(position, dict):
        return None
    try:
        x, y = position.get("x"), position.get("y")
        if isinstance(x, bool) or isinstance(y, bool):
            return None
        point = {"x": float(x), "y": float(y)}  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return point if all(math.isfinite(v) for v in point.values()) else None


class EdgeDefinition(BaseModel):
    """Carries the ``sourceHandle`` output of ``source`` into the ``targetHandle`` input."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: (
        Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH), AfterValidator(_printable)]
        | None
    ) = None
    source: NodeId
    source_handle: HandleName = Field(alias="sourceHandle", description="an output name")
    target: NodeId
    target_handle: HandleName = Field(alias="targetHandle", description="an input name")


class WorkflowDefinition(BaseModel):
    """A parsed definition. Build it with :func:`validate_definition`, which checks the
    graph and the node types; validating this model alone checks only the shape."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal[1] = Field(description="format version; currently 1")
    nodes: list[NodeDefinition]
    edges: list[EdgeDefinition] = Field(default_factory=list)

    def node(self, node_id: str) -> NodeDefinition:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def to_dict(self) -> dict[str, Any]:
        """The canonical (flat) JSON-friendly form."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)


# --- JSON Schema ------------------------------------------------------------------------

_PORT_JSON_TYPES: dict[str, dict[str, Any]] = {
    "string": {"type": ["string", "null"]},
    "html": {"type": ["string", "null"], "contentMediaType": "text/html"},
    "number": {"type": ["number", "null"]},
    "integer": {"type": ["integer", "null"]},
    "boolean": {"type": ["boolean", "null"]},
    "json": {},
    "any": {},
}


def _node_type_rule(node_type: NodeType) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, spec in node_type.inputs.items():
        schema = dict(_PORT_JSON_TYPES[spec.type])
        if spec.description:
            schema["description"] = spec.description
        if spec.default is not None:
            schema["default"] = spec.default
        if spec.choices is not None:
            schema["enum"] = [*spec.choices, None]
        schema["x-required"] = spec.required  # static value OR an incoming edge
        properties[name] = schema
    return {
        "if": {"properties": {"type": {"const": node_type.type}}, "required": ["type"]},
        "then": {
            "properties": {
                "inputs": {
                    "type": "object",
                    "properties": properties,
                    "additionalProperties": False,
                }
            }
        },
    }


def definition_json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of the definition format, for front ends.

    Per registered node type, an ``if``/``then`` rule types its static inputs, and
    ``x-node-types`` describes every type (ports, credits, credential use). Required
    inputs are marked ``x-required`` rather than ``required``: an edge can satisfy them.
    Graph rules (cycles, dangling edges, ...) are beyond JSON Schema; the server checks
    them.
    """
    schema = WorkflowDefinition.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Flow Builder workflow definition"
    types = dict(sorted(node_types().items()))
    node_schema = schema["$defs"]["NodeDefinition"]
    node_schema["allOf"] = [_node_type_rule(t) for t in types.values()]
    node_schema["properties"]["data"] = {
        "type": "object",
        "description": "React Flow nesting: inputs and credential_id may live here instead",
    }
    schema["x-node-types"] = {name: t.describe() for name, t in types.items()}
    return schema


# --- validation -------------------------------------------------------------------------


def _key_path(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    text = str(key)
    if text.isidentifier():
        return f"{prefix}.{text}" if prefix else text
    return f"{prefix}[{json.dumps(text)}]"


def _pydantic_problems(exc: ValidationError, prefix: str) -> list[DefinitionProblem]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        path = prefix
        for part in err["loc"]:
            path = _key_path(path, part)
        kind = err["type"]
        if kind == "missing":
            code = MISSING_FIELD
        elif kind.endswith("_type") or kind in ("model_attributes_type", "dataclass_type"):
            code = WRONG_TYPE
        else:
            code = INVALID_VALUE
        problems.append(DefinitionProblem(path, code, err["msg"]))
    return problems


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _load(raw: Any, max_bytes: int) -> tuple[Any, DefinitionProblem | None]:
    """Size-check then parse the raw input. Bytes are checked before parsing."""
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if isinstance(raw, str):
        # len(str) <= bytes <= 4 * len(str): only encode when the length cannot decide.
        if len(raw) > max_bytes:
            size: int | None = max_bytes + 1
        elif len(raw) * 4 <= max_bytes:
            size = None
        else:
            try:
                size = len(raw.encode("utf-8"))
            except UnicodeEncodeError:
                return None, DefinitionProblem("", INVALID_JSON, "text is not valid Unicode")
        if size is not None and size > max_bytes:
            return None, _too_large(max_bytes)
    elif isinstance(raw, bytes):
        if len(raw) > max_bytes:
            return None, _too_large(max_bytes)
    elif isinstance(raw, Mapping):
        try:
            text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            size = len(text.encode("utf-8"))
        except (TypeError, ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return None, DefinitionProblem("", INVALID_JSON, f"not valid JSON: {reason}")
        if size > max_bytes:
            return None, _too_large(max_bytes)
        return raw, None
    else:
        return None, DefinitionProblem(
            "", WRONG_TYPE, f"a definition must be a JSON object, got {describe_type(raw)}"
        )
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float), None
    except RecursionError:
        return None, DefinitionProblem("", INVALID_JSON, "not valid JSON: nested too deeply")
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        return None, DefinitionProblem("", INVALID_JSON, f"not valid JSON: {exc}")


def storability_problem(data: Any) -> DefinitionProblem | None:
    """Whether the database can store ``data`` as JSON: no NUL or lone surrogate in any
    string or key, no NaN or Infinity, nesting within MAX_DOCUMENT_DEPTH. One iterative
    pass; used for drafts too (they are stored before they are ever validated)."""
    try:
        make_storable(data, max_depth=MAX_DOCUMENT_DEPTH, repair=False)
    except Unstorable as exc:
        code = TOO_DEEP if "nested deeper" in exc.problem else INVALID_VALUE
        return DefinitionProblem(exc.path, code, exc.problem)
    return None


def _too_large(max_bytes: int) -> DefinitionProblem:
    return DefinitionProblem(
        "", TOO_LARGE, f"definition is larger than {max_bytes} bytes (MAX_DEFINITION_BYTES)"
    )


def _owned_set(owned: Collection[Any] | None) -> set[uuid.UUID] | None:
    if owned is None:
        return None
    result: set[uuid.UUID] = set()
    for item in owned:
        if isinstance(item, uuid.UUID):
            result.add(item)
        else:
            try:
                result.add(uuid.UUID(str(item)))
            except ValueError:
                continue
    return result


class _Validator:
    """One validation run; collects problems instead of stopping at the first."""

    def __init__(self, owned: set[uuid.UUID] | None) -> None:
        self.owned = owned
        self.problems: list[DefinitionProblem] = []

    def add(self, path: str, code: str, message: str) -> None:
        self.problems.append(DefinitionProblem(path, code, message))

    # The document ---------------------------------------------------------------------

    def run(self, data: Any, max_nodes: int) -> WorkflowDefinition | None:
        if not isinstance(data, dict):
            self.add(
                "", WRONG_TYPE, f"a definition must be a JSON object, got {describe_type(data)}"
            )
            return None
        version = data.get("version")
        supported = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        if "version" not in data:
            self.add(
                "version", UNSUPPORTED_VERSION, f"version is required (supported: {supported})"
            )
        elif not _is_version(version):
            shown = repr(version)[:40] if _is_scalar(version) else describe_type(version)
            self.add(
                "version",
                UNSUPPORTED_VERSION,
                f"unsupported version {shown} (supported: {supported})",
            )
        raw_nodes = data.get("nodes")
        raw_edges = data.get("edges", [])
        if raw_nodes is None:
            self.add("nodes", MISSING_FIELD, "nodes is required (a list of nodes)")
            raw_nodes = []
        elif not isinstance(raw_nodes, list):
            self.add("nodes", WRONG_TYPE, f"nodes must be a list, got {describe_type(raw_nodes)}")
            raw_nodes = []
        elif not raw_nodes:
            self.add("nodes", NO_ENTRY_POINT, "the workflow has no nodes")
        if raw_edges is None:
            raw_edges = []
        elif not isinstance(raw_edges, list):
            self.add("edges", WRONG_TYPE, f"edges must be a list, got {describe_type(raw_edges)}")
            raw_edges = []
        if len(raw_nodes) > max_nodes:
            self.add(
                "nodes",
                TOO_MANY_NODES,
                f"{len(raw_nodes)} nodes, more than the limit of {max_nodes} "
                "(MAX_DEFINITION_NODES)",
            )
            return None  # do not spend time on a definition that cannot be accepted
        nodes = self._parse_items(raw_nodes, "nodes", NodeDefinition)
        edges = self._parse_items(raw_edges, "edges", EdgeDefinition)
        self._check_graph(raw_nodes, nodes, edges)
        if self.problems:
            return None
        return WorkflowDefinition.model_construct(
            version=CURRENT_VERSION,
            nodes=[n for _, n in nodes],
            edges=[e for _, e in edges],
        )

    def _parse_items(self, raw: list[Any], name: str, model: type[BaseModel]) -> list[Any]:
        parsed = []
        for index, item in enumerate(raw):
            path = f"{name}[{index}]"
            if not isinstance(item, dict):
                self.add(path, WRONG_TYPE, f"must be an object, got {describe_type(item)}")
                continue
            try:
                parsed.append((index, model.model_validate(item)))
            except ValidationError as exc:
                self.problems.extend(_pydantic_problems(exc, path))
        return parsed

    # The graph ------------------------------------------------------------------------

    def _check_graph(
        self,
        raw_nodes: list[Any],
        nodes: list[tuple[int, NodeDefinition]],
        edges: list[tuple[int, EdgeDefinition]],
    ) -> None:
        # Ids of nodes that failed to parse: edges to them are not "dangling" (the node's
        # own problem is already reported), but they take no part in the graph checks.
        broken_ids = {
            item.get("id")
            for item in raw_nodes
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        }
        by_id: dict[str, tuple[int, NodeDefinition, NodeType | None]] = {}
        for index, node in nodes:
            node_type = find_node_type(node.type)
            if node.id in by_id:
                first = by_id[node.id][0]
                self.add(
                    f"nodes[{index}].id",
                    DUPLICATE_NODE_ID,
                    f"node id {node.id!r} is already used by nodes[{first}]",
                )
                # Still checked below, but kept out of the graph: edges name the first.
            else:
                by_id[node.id] = (index, node, node_type)
            if node_type is None:
                self.add(
                    f"nodes[{index}].type", UNKNOWN_NODE_TYPE, f"unknown node type {node.type!r}"
                )
                continue
            self._check_credential(index, node, node_type)
            self._check_static_inputs(index, node, node_type)
        broken_ids -= by_id.keys()

        successors: dict[str, list[str]] = {node_id: [] for node_id in by_id}
        indegree: dict[str, int] = dict.fromkeys(by_id, 0)
        fed_inputs: dict[tuple[str, str], int] = {}
        edge_ids: dict[str, int] = {}
        for index, edge in edges:
            path = f"edges[{index}]"
            if edge.id:
                if edge.id in edge_ids:
                    self.add(
                        f"{path}.id",
                        DUPLICATE_EDGE_ID,
                        f"edge id {edge.id!r} is already used by edges[{edge_ids[edge.id]}]",
                    )
                else:
                    edge_ids[edge.id] = index
            source = by_id.get(edge.source)
            target = by_id.get(edge.target)
            if source is None and edge.source not in broken_ids:
                self.add(f"{path}.source", DANGLING_EDGE, f"no node with id {edge.source!r}")
            if target is None and edge.target not in broken_ids:
                self.add(f"{path}.target", DANGLING_EDGE, f"no node with id {edge.target!r}")
            out_spec = in_spec = None
            if source is not None and source[2] is not None:
                out_spec = source[2].outputs.get(edge.source_handle)
                if out_spec is None:
                    self.add(
                        f"{path}.sourceHandle",
                        DANGLING_EDGE,
                        f"node {edge.source!r} ({source[2].type}) has no output "
                        f"{edge.source_handle!r} (outputs: {_names(source[2].outputs)})",
                    )
            if target is not None and target[2] is not None:
                in_spec = target[2].inputs.get(edge.target_handle)
                if in_spec is None:
                    self.add(
                        f"{path}.targetHandle",
                        DANGLING_EDGE,
                        f"node {edge.target!r} ({target[2].type}) has no input "
                        f"{edge.target_handle!r} (inputs: {_names(target[2].inputs)})",
                    )
            if (
                out_spec is not None
                and in_spec is not None
                and not types_compatible(out_spec.type, in_spec.type)
            ):
                self.add(
                    path,
                    WRONG_TYPE,
                    f"output {edge.source_handle!r} of {edge.source!r} is {out_spec.type}; "
                    f"input {edge.target_handle!r} of {edge.target!r} needs {in_spec.type}",
                )
            if target is not None:
                key = (edge.target, edge.target_handle)
                if key in fed_inputs:
                    self.add(
                        f"{path}.targetHandle",
                        MULTIPLE_EDGES_TO_INPUT,
                        f"input {edge.target_handle!r} of node {edge.target!r} already has an "
                        f"incoming edge (edges[{fed_inputs[key]}])",
                    )
                else:
                    fed_inputs[key] = index
            if source is not None and target is not None:
                successors[edge.source].append(edge.target)
                indegree[edge.target] += 1

        for node_id, (index, node, node_type) in by_id.items():
            if node_type is None:
                continue
            for name, spec in node_type.inputs.items():
                if (
                    spec.required
                    and spec.default is None
                    and node.inputs.get(name) is None
                    and (node_id, name) not in fed_inputs
                ):
                    self.add(
                        _key_path(f"nodes[{index}].inputs", name),
                        MISSING_INPUT,
                        f"required input {name!r} of {node_type.type} has no value and no "
                        "incoming edge",
                    )

        if by_id and all(indegree.values()):
            self.add(
                "nodes",
                NO_ENTRY_POINT,
                "every node has an incoming edge, so there is no node to start from",
            )
        self._check_cycles(by_id, successors, indegree)

    def _check_credential(self, index: int, node: NodeDefinition, node_type: NodeType) -> None:
        path = f"nodes[{index}].credential_id"
        if node.credential_id is None:
            if node_type.credential == "required":
                self.add(
                    path, CREDENTIAL_REQUIRED, f"node type {node_type.type} needs a credential"
                )
            return
        if node_type.credential == "none":
            self.add(
                path, CREDENTIAL_NOT_ALLOWED, f"node type {node_type.type} takes no credential"
            )
        elif self.owned is not None and node.credential_id not in self.owned:
            self.add(
                path,
                CREDENTIAL_NOT_OWNED,
                f"credential {node.credential_id} does not exist or belongs to another user",
            )

    def _check_static_inputs(self, index: int, node: NodeDefinition, node_type: NodeType) -> None:
        prefix = f"nodes[{index}].inputs"
        typed: dict[str, Any] = {}
        for name, value in node.inputs.items():
            path = _key_path(prefix, name)
            spec = node_type.inputs.get(name)
            if spec is None:
                self.add(
                    path,
                    UNKNOWN_INPUT,
                    f"{node_type.type} has no input {name!r} (inputs: {_names(node_type.inputs)})",
                )
            elif value is None:
                continue
            elif not value_matches(spec.type, value):
                self.add(path, WRONG_TYPE, f"must be {spec.type}, got {describe_type(value)}")
            elif _too_deep(value, MAX_INPUT_DEPTH):
                self.add(path, TOO_DEEP, f"nested deeper than {MAX_INPUT_DEPTH} levels")
            else:
                typed[name] = value
        try:
            found = node_type.check_static_inputs(typed)
        except Exception:  # a plugin's bug must not turn into a 500
            logger.exception("node_static_check_failed", node_type=node_type.type)
            self.add(prefix, INVALID_VALUE, f"{node_type.type} could not check its inputs")
            return
        for name, code, message in found:
            self.add(_key_path(prefix, name) if name else prefix, code, message)

    def _check_cycles(
        self,
        by_id: Mapping[str, tuple[int, NodeDefinition, NodeType | None]],
        successors: Mapping[str, list[str]],
        indegree: Mapping[str, int],
    ) -> None:
        remaining = dict(indegree)
        queue = [node_id for node_id, degree in remaining.items() if degree == 0]
        done = 0
        while queue:
            node_id = queue.pop()
            done += 1
            for nxt in successors[node_id]:
                remaining[nxt] -= 1
                if remaining[nxt] == 0:
                    queue.append(nxt)
        if done == len(remaining):
            return
        stuck = {node_id for node_id, degree in remaining.items() if degree > 0}
        for component in strongly_connected(stuck, successors):
            if len(component) == 1:
                (only,) = component
                if only not in successors[only]:
                    continue  # downstream of a cycle, not on one
            ordered = sorted(component, key=lambda n: by_id[n][0])
            shown = ", ".join(repr(n) for n in ordered[:10]) + (" ..." if len(ordered) > 10 else "")
            self.add(
                f"nodes[{by_id[ordered[0]][0]}]",
                CYCLE,
                f"nodes {shown} form a cycle" if len(ordered) > 1 else f"node {shown} feeds itself",
            )


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in SUPPORTED_VERSIONS


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _names(ports: Mapping[str, Any]) -> str:
    return ", ".join(ports) or "none"


def strongly_connected(nodes: set[str], successors: Mapping[str, list[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit), restricted to ``nodes``.

    Also used by the import-graph test, which finds cycles between modules with it."""
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    adjacency = {node: [n for n in successors[node] if n in nodes] for node in nodes}
    counter = 0
    for root in sorted(nodes):
        if root in index_of:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index_of[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = adjacency[node]
            recursed = False
            for position in range(child, len(children)):
                nxt = children[position]
                if nxt not in index_of:
                    work.append((node, position + 1))
                    work.append((nxt, 0))
                    recursed = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index_of[nxt])
            if recursed:
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index_of[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def validate_definition(
    raw: dict[str, Any] | str | bytes,
    *,
    owned_credential_ids: Collection[uuid.UUID] | None,
) -> WorkflowDefinition:
    """Parse and check a workflow definition; raise ValidationFailed listing every problem.

    ``raw`` is the JSON text (str/bytes, size-checked before parsing) or the decoded
    object (size-checked by serializing it once). ``owned_credential_ids`` are the
    credentials of the workflow's owner; pass None to skip only the ownership check.
    Never raises anything but ValidationFailed for bad input.
    """
    settings = get_settings()
    data, problem = _load(raw, settings.MAX_DEFINITION_BYTES)
    if problem is None:
        problem = storability_problem(data)
    if problem is not None:
        raise ValidationFailed([problem], what="workflow definition")
    validator = _Validator(_owned_set(owned_credential_ids))
    definition = validator.run(data, settings.MAX_DEFINITION_NODES)
    if validator.problems or definition is None:
        raise ValidationFailed(validator.problems, what="workflow definition")
    return definition
