"""Execution plans: a validated definition grouped into phases, ready for a worker.

Phase 1 holds the entry nodes (no incoming edge); a node's phase is one more than the
highest phase among its predecessors (Kahn levels), so every edge goes from a lower
phase to a higher one and the nodes of a phase never depend on each other. Inside a
phase, nodes keep their order in the definition.

A plan is self-contained: it carries each node's static inputs, port defaults, edges,
credits and retry policy, so the worker does not need the definition (or even the
node registry's declarations, apart from ``run``) to execute it, and a plan stored as
JSON (:meth:`ExecutionPlan.to_dict`) comes back identical (:meth:`ExecutionPlan.from_dict`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowbuilder.platform.definitions import WorkflowDefinition
from flowbuilder.platform.errors import FlowBuilderError
from flowbuilder.platform.jsonvalues import SerialisedJSON, copy_json, serialised_object
from flowbuilder.platform.nodes import find_node_type
from flowbuilder.platform.nodes.base import NodeError

PLAN_FORMAT_VERSION = 1


class PlanError(FlowBuilderError):
    """A plan cannot be built (the definition was not validated) or loaded."""


class MissingInput(NodeError):
    """A required input has no value when the node is about to run."""


@dataclass(frozen=True, slots=True)
class InputBinding:
    """An incoming edge: ``source_node``'s ``source_handle`` output feeds ``input``."""

    input: str
    source_node: str
    source_handle: str

    def to_dict(self) -> dict[str, str]:
        return {
            "input": self.input,
            "source_node": self.source_node,
            "source_handle": self.source_handle,
        }


@dataclass(frozen=True, slots=True)
class PlannedNode:
    """One node of the plan. ``number`` is its phase number (1 = entry nodes)."""

    node_id: str
    node_type: str
    number: int
    credits: int
    credential_id: uuid.UUID | None
    timeout_seconds: float
    static_inputs: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required_inputs: tuple[str, ...] = ()
    bindings: tuple[InputBinding, ...] = ()
    retryable: bool = False
    max_retries: int = 0
    retry_backoff_seconds: float = 1.0

    @property
    def phase(self) -> int:
        return self.number

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "node_type": self.node_type,
            "number": self.number,
            "credits": self.credits,
            "credential_id": str(self.credential_id) if self.credential_id else None,
            "timeout_seconds": self.timeout_seconds,
            "static_inputs": copy.deepcopy(dict(self.static_inputs)),
            "defaults": copy.deepcopy(dict(self.defaults)),
            "required_inputs": list(self.required_inputs),
            "bindings": [b.to_dict() for b in self.bindings],
            "retryable": self.retryable,
            "max_retries": self.max_retries,
            "retry_backoff_seconds": self.retry_backoff_seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlannedNode:
        credential = data.get("credential_id")
        return cls(
            node_id=str(data["node_id"]),
            node_type=str(data["node_type"]),
            number=int(data["number"]),
            credits=int(data["credits"]),
            credential_id=uuid.UUID(str(credential)) if credential else None,
            timeout_seconds=float(data["timeout_seconds"]),
            static_inputs=dict(data.get("static_inputs") or {}),
            defaults=dict(data.get("defaults") or {}),
            required_inputs=tuple(data.get("required_inputs") or ()),
            bindings=tuple(
                InputBinding(str(b["input"]), str(b["source_node"]), str(b["source_handle"]))
                for b in data.get("bindings") or ()
            ),
            retryable=bool(data.get("retryable", False)),
            max_retries=int(data.get("max_retries", 0)),
            retry_backoff_seconds=float(data.get("retry_backoff_seconds", 1.0)),
        )


@dataclass(frozen=True)
class ExecutionPlan:
    """Phases of nodes in topological order. Build it with :func:`build_plan`."""

    phases: list[list[PlannedNode]]
    nodes: list[PlannedNode] = field(init=False)
    total_credits: int = field(init=False)
    _by_id: dict[str, PlannedNode] = field(init=False, repr=False, compare=False)
    # How many inputs read each (node, output): one reader may have the value uncopied.
    _readers: dict[tuple[str, str], int] = field(init=False, repr=False, compare=False)
    _worst_case: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = [node for phase in self.phases for node in phase]
        by_id = {node.node_id: node for node in ordered}
        if len(by_id) != len(ordered):
            raise PlanError("a node appears more than once in the plan")
        for number, phase in enumerate(self.phases, start=1):
            if not phase:
                raise PlanError(f"phase {number} is empty")
            for node in phase:
                if node.number != number:
                    raise PlanError(
                        f"node {node.node_id!r} is numbered {node.number}, in phase {number}"
                    )
                for binding in node.bindings:
                    source = by_id.get(binding.source_node)
                    if source is None or source.number >= number:
                        raise PlanError(
                            f"node {node.node_id!r} depends on {binding.source_node!r}, "
                            "which does not run before it"
                        )
        object.__setattr__(self, "nodes", ordered)
        object.__setattr__(self, "total_credits", sum(node.credits for node in ordered))
        object.__setattr__(self, "_by_id", by_id)
        readers: dict[tuple[str, str], int] = {}
        for node in ordered:
            for binding in node.bindings:
                key = (binding.source_node, binding.source_handle)
                readers[key] = readers.get(key, 0) + 1
        object.__setattr__(self, "_readers", readers)
        object.__setattr__(self, "_worst_case", self._worst_case_of(self.phases))

    def node(self, node_id: str) -> PlannedNode:
        try:
            return self._by_id[node_id]
        except KeyError:
            raise PlanError(f"no node {node_id!r} in the plan") from None

    def worst_case_seconds(self) -> float:
        """The longest this plan can run: phases one after another, each as long as its
        slowest node with every attempt timing out (the engine's half-second grace per
        attempt included) and the back-offs between attempts. What a run really takes is
        usually far less; this bounds it (the execution budget bounds it too). Computed
        once per plan."""
        return self._worst_case

    @staticmethod
    def _worst_case_of(phases: list[list[PlannedNode]]) -> float:
        total = 0.0
        for phase in phases:
            longest = 0.0
            for node in phase:
                attempts = 1 + (node.max_retries if node.retryable else 0)
                backoffs = sum(node.retry_backoff_seconds * 2**k for k in range(attempts - 1))
                longest = max(longest, attempts * (node.timeout_seconds + 0.5) + backoffs)
            total += longest
        return total

    def phase_credits(self, number: int) -> int:
        return sum(node.credits for node in self.phases[number - 1])

    def resolve_inputs(
        self,
        node_id: str,
        outputs_by_node: Mapping[str, Mapping[str, Any]],
        *,
        hand_over_sole: bool = False,
        serialised: bool = False,
    ) -> dict[str, Any]:
        """The inputs ``node_id`` runs with: port defaults, overridden by its static
        inputs, overridden by the values arriving on its incoming edges.

        ``outputs_by_node`` maps each finished node id to its outputs. A static
        ``null`` counts as no value. Values are copied (iteratively: deep values never
        raise RecursionError) so a node that mutates its inputs cannot change the plan or
        what another node receives, nor ``outputs_by_node``. With ``hand_over_sole`` (the
        engine, whose ``outputs_by_node`` is its own and already stored), an output that
        this one input alone reads in the whole plan is handed over uncopied: copying a
        large output was most of a phase's cost, and no other node can see a change to
        it. Raises MissingInput
        when a required input ends up without a value (e.g. an upstream node did not
        produce the output), PlanError when an upstream node has not run.

        With ``serialised`` (the engine, which stores the inputs), the inputs come as a
        :class:`~flowbuilder.platform.jsonvalues.SerialisedJSON` whose text reuses the
        text of each upstream output value when the upstream outputs carry it (their
        ``parts``, made at the node boundary): a large output passed on is not
        serialised a second time to store the inputs.
        """
        node = self.node(node_id)
        inputs: dict[str, Any] = {}
        known: dict[str, str] = {}  # with serialised: the JSON text of bound inputs
        for name, value in node.defaults.items():
            if value is not None:
                inputs[name] = copy_json(value)
        for name, value in node.static_inputs.items():
            if value is not None:
                inputs[name] = copy_json(value)
        for binding in node.bindings:
            upstream = outputs_by_node.get(binding.source_node)
            if upstream is None:
                raise PlanError(
                    f"node {node_id!r} needs the outputs of {binding.source_node!r}, "
                    "which has not run"
                )
            if binding.source_handle in upstream:
                value = upstream[binding.source_handle]
                sole = (
                    hand_over_sole
                    and self._readers.get((binding.source_node, binding.source_handle)) == 1
                )
                inputs[binding.input] = value if sole else copy_json(value)
                if serialised:
                    part = _part(upstream, binding.source_handle)
                    if part is None:
                        known.pop(binding.input, None)
                    else:
                        known[binding.input] = part
        for name in node.required_inputs:
            if inputs.get(name) is None:
                raise MissingInput(f"required input {name!r} of node {node_id!r} has no value")
        if serialised:
            try:
                return serialised_object(inputs, known)
            except (TypeError, ValueError, RecursionError):
                pass  # not JSON after all: the database's serialiser decides, as before
        return inputs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (UUIDs as strings) that :meth:`from_dict` reads back."""
        return {
            "version": PLAN_FORMAT_VERSION,
            "total_credits": self.total_credits,
            "phases": [[node.to_dict() for node in phase] for phase in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionPlan:
        if not isinstance(data, Mapping) or data.get("version") != PLAN_FORMAT_VERSION:
            raise PlanError("not a stored execution plan (unknown or missing version)")
        try:
            phases = [[PlannedNode.from_dict(item) for item in phase] for phase in data["phases"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"malformed stored execution plan: {type(exc).__name__}: {exc}"
            ) from None
        plan = cls(phases)
        if "total_credits" in data and data["total_credits"] != plan.total_credits:
            raise PlanError("stored execution plan: total_credits does not match its nodes")
        return plan


def _part(outputs: Mapping[str, Any], handle: str) -> str | None:
    """The JSON text of ``outputs[handle]`` when the outputs carry it, else None."""
    if type(outputs) is SerialisedJSON and outputs.parts is not None:
        return outputs.parts.get(handle)
    return None


def build_plan(definition: WorkflowDefinition) -> ExecutionPlan:
    """Group a validated definition's nodes into phases (O(V + E)).

    Raises PlanError for an unknown node type, a dangling edge or a cycle: these are
    caught by :func:`~flowbuilder.platform.definitions.validate_definition`, so they
    only happen with a definition that skipped it.
    """
    order = {node.id: index for index, node in enumerate(definition.nodes)}
    if len(order) != len(definition.nodes):
        raise PlanError("duplicate node ids")
    successors: dict[str, list[str]] = {node_id: [] for node_id in order}
    indegree = dict.fromkeys(order, 0)
    bindings: dict[str, list[InputBinding]] = {node_id: [] for node_id in order}
    for edge in definition.edges:
        if edge.source not in order or edge.target not in order:
            raise PlanError(f"edge {edge.source!r} -> {edge.target!r} refers to an unknown node")
        successors[edge.source].append(edge.target)
        indegree[edge.target] += 1
        bindings[edge.target].append(
            InputBinding(edge.target_handle, edge.source, edge.source_handle)
        )

    number: dict[str, int] = {}
    queue = [node_id for node_id in order if indegree[node_id] == 0]
    for node_id in queue:  # the list grows while we walk it: a FIFO without popping
        number.setdefault(node_id, 1)
        for nxt in successors[node_id]:
            number[nxt] = max(number.get(nxt, 1), number[node_id] + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                queue.append(nxt)
    if len(queue) != len(order):
        raise PlanError("the workflow graph has a cycle")

    phases: list[list[PlannedNode]] = [[] for _ in range(max(number.values(), default=0))]
    for node in definition.nodes:  # definition order inside each phase
        node_type = find_node_type(node.type)
        if node_type is None:
            raise PlanError(f"unknown node type {node.type!r}")
        phase = number[node.id]
        phases[phase - 1].append(
            PlannedNode(
                node_id=node.id,
                node_type=node.type,
                number=phase,
                credits=node_type.credits,
                credential_id=node.credential_id,
                timeout_seconds=float(node_type.timeout_seconds),
                static_inputs={k: v for k, v in node.inputs.items() if v is not None},
                defaults={
                    name: spec.default
                    for name, spec in node_type.inputs.items()
                    if spec.default is not None
                },
                required_inputs=tuple(
                    name for name, spec in node_type.inputs.items() if spec.required
                ),
                bindings=tuple(bindings[node.id]),
                retryable=node_type.retryable,
                max_retries=node_type.max_retries,
                retry_backoff_seconds=float(node_type.retry_backoff_seconds),
            )
        )
    return ExecutionPlan(phases)
