"""Node types: port specs, the context a node runs in, and the node errors.

A node type is a small object describing what a node accepts (``inputs``), what it
produces (``outputs``), what it costs (``credits``) and how it runs (``run``). The
definition validator and the plan builder only read the declarative part, so they
need no worker, no database and no network.

A node never sees a database session: everything it may use arrives in its
:class:`NodeContext` (ids, an optional decrypted credential, a log collector, a
deadline and a cancellation probe).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, NamedTuple, get_args

from pydantic import SecretStr

# Defined in errors.py (see there why); re-exported here, where node code looks for them.
from flowbuilder.platform.errors import NodeCancelled as NodeCancelled
from flowbuilder.platform.errors import NodeError as NodeError
from flowbuilder.platform.errors import NodeTimeout as NodeTimeout
from flowbuilder.platform.errors import TransientNodeError as TransientNodeError

PortType = Literal["string", "number", "integer", "boolean", "json", "any", "html"]
PORT_TYPES: frozenset[str] = frozenset(get_args(PortType))

CredentialMode = Literal["none", "optional", "required"]
CREDENTIAL_MODES: frozenset[str] = frozenset(get_args(CredentialMode))


# --- errors -----------------------------------------------------------------------------


class UnknownNodeType(NodeError):
    def __init__(self, type_name: str, known: list[str]) -> None:
        self.type_name = type_name
        shown = ", ".join(known[:30]) + (" ..." if len(known) > 30 else "")
        super().__init__(f"unknown node type {type_name!r} (known types: {shown})")


# --- ports ------------------------------------------------------------------------------


def value_matches(port_type: str, value: Any) -> bool:
    """Whether ``value`` fits a port of ``port_type`` (``None`` is handled by callers)."""
    if port_type in ("any", "json"):
        return True
    if port_type in ("string", "html"):
        return isinstance(value, str)
    if port_type == "boolean":
        return isinstance(value, bool)
    if port_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if port_type == "number":
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return True
        return isinstance(value, float) and math.isfinite(value)
    return False


def types_compatible(output_type: str, input_type: str) -> bool:
    """Whether an edge may carry an ``output_type`` value into an ``input_type`` port.

    Deliberately lenient where the value is only known at run time (``any`` and
    ``json`` outputs); the node checks the actual value then.
    """
    if output_type == input_type or "any" in (output_type, input_type):
        return True
    if input_type == "json":
        return True
    if output_type == "json":
        # A JSON value may be a string, a number, ...: only the run can tell.
        return True
    if {output_type, input_type} <= {"string", "html"}:
        return True
    return output_type == "integer" and input_type == "number"


def describe_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One input or output of a node type.

    ``required`` inputs must get a static value or an incoming edge; ``default`` is
    used when neither gives a value. ``choices`` restricts a static value.
    """

    type: PortType = "any"
    required: bool = False
    default: Any = None
    description: str = ""
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in PORT_TYPES:
            raise ValueError(f"unknown port type {self.type!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "required": self.required}
        if self.default is not None:
            data["default"] = self.default
        if self.description:
            data["description"] = self.description
        if self.choices is not None:
            data["choices"] = list(self.choices)
        return data


# --- context ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeCredential:
    """A decrypted credential handed to one node. ``repr`` never shows the secret."""

    type: str
    secret: SecretStr
    name: str = ""


class LogEntry(NamedTuple):
    level: str
    message: str
    timestamp: datetime


class NodeLogger:
    """Collects a node's log lines; the worker turns them into ExecutionLog rows.

    Bounded so a chatty (or looping) node cannot exhaust memory: past
    ``max_entries`` lines only a counter grows, and one final line says how many
    were dropped.
    """

    LEVELS: ClassVar[tuple[str, ...]] = ("debug", "info", "warning", "error")

    def __init__(self, max_entries: int = 1000, max_message_chars: int = 4000) -> None:
        self.entries: list[LogEntry] = []
        self.max_entries = max_entries
        self.max_message_chars = max_message_chars
        self.dropped = 0

    def log(self, level: str, message: str) -> None:
        if level not in self.LEVELS:
            level = "info"
        if len(self.entries) >= self.max_entries:
            self.dropped += 1
            return
        text = str(message)
        if len(text) > self.max_message_chars:
            text = text[: self.max_message_chars] + "... (truncated)"
        self.entries.append(LogEntry(level, text, datetime.now(UTC)))

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def warning(self, message: str) -> None:
        self.log("warning", message)

    def error(self, message: str) -> None:
        self.log("error", message)

    def drain(self) -> list[LogEntry]:
        """Return the collected entries and start over (for batched inserts)."""
        entries = self.entries
        if self.dropped:
            note = f"{self.dropped} log lines dropped (limit {self.max_entries})"
            entries.append(LogEntry("warning", note, datetime.now(UTC)))
            self.dropped = 0
        self.entries = []
        return entries


def _default_deadline() -> float:
    return time.monotonic() + 60.0


@dataclass(slots=True)
class NodeContext:
    """Everything a running node may use. It never holds a database session."""

    execution_id: Any
    user_id: Any
    node_id: str
    credential: NodeCredential | None = None
    log: NodeLogger = field(default_factory=NodeLogger)
    deadline: float = field(default_factory=_default_deadline)  # time.monotonic() value
    cancelled: Callable[[], bool] | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def is_cancelled(self) -> bool:
        return bool(self.cancelled and self.cancelled())

    def check(self) -> None:
        """Raise if the execution was cancelled or the deadline has passed."""
        if self.is_cancelled():
            raise NodeCancelled(f"node {self.node_id} cancelled")
        if self.remaining() <= 0:
            raise NodeTimeout(f"node {self.node_id} ran out of time")


# --- node types -------------------------------------------------------------------------

InputProblem = tuple[str, str, str]
"""``(input name, code, message)`` returned by :meth:`NodeType.check_static_inputs`."""


class NodeType:
    """A kind of node. Subclass and override ``run``, or pass keyword overrides.

    Class attributes give the defaults; ``NodeType(type="x", run=fn, ...)`` builds one
    without subclassing (handy for plugins). ``run`` must be thread-safe: one instance
    serves every execution.
    """

    type: str = ""
    description: str = ""
    inputs: Mapping[str, PortSpec] = {}
    outputs: Mapping[str, PortSpec] = {}
    credits: int = 1
    timeout_seconds: float = 60.0
    credential: CredentialMode = "none"
    retryable: bool = False
    max_retries: int = 0
    retry_backoff_seconds: float = 1.0
    # True only for a type whose ``run`` never changes its inputs in place: a value it
    # passes on as it came is then stored with the text it came with, unchecked (the
    # engine skips serialising it again). Wrong, the database would keep the old value
    # while the next node gets the changed one; the default checks.
    keeps_inputs: bool = False
    # True only for a type whose ``run`` computes from its inputs and nothing else: no
    # call out of the process, no credential, nothing it changes that outlives the call,
    # its inputs included (never changed in place). The engine may then start it before
    # its phase's start is committed and throw its result away if that transaction is
    # refused (the run was cancelled, its lease lost, its credits short, or the
    # phase already debited by an earlier delivery: then it runs again, with the same
    # inputs). Wrong, a refused phase would still have had its effect (a request sent
    # without being paid for, after a cancel); the default waits.
    pure: bool = False
    # True only for a pure type whose ``run`` ends by its context's deadline on its own and
    # soon after a cancel (it waits in short slices, checking both: ``NodeContext.check``).
    # The engine may then call it on the run's own thread, with its phase's transaction
    # on another, instead of on a node thread it would wait for from outside: no thread
    # hand-over before and after the node. Wrong, a node that overran its timeout would
    # hold the run (and its worker process) until the worker's time limit; the default
    # gives the node its own thread.
    inline: bool = False

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "type",
        "description",
        "inputs",
        "outputs",
        "credits",
        "timeout_seconds",
        "credential",
        "retryable",
        "max_retries",
        "retry_backoff_seconds",
        "keeps_inputs",
        "pure",
        "inline",
    )

    def __init__(
        self,
        *,
        run: Callable[[dict[str, Any], NodeContext], dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> None:
        unknown = set(overrides) - set(self._FIELDS)
        if unknown:
            raise TypeError(f"unknown NodeType fields: {', '.join(sorted(unknown))}")
        for name, value in overrides.items():
            setattr(self, name, value)
        if run is not None:
            self._run_function = run

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.type!r}>"

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        """Do the work and return the outputs (output name -> value)."""
        function = getattr(self, "_run_function", None)
        if function is None:
            raise NotImplementedError(f"node type {self.type!r} has no run()")
        return function(inputs, ctx)

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        """Node-specific checks of the static inputs of a definition (no I/O allowed).

        Called by the definition validator after the generic type checks, only with
        values that already match their port types. Returns problems, never raises.
        """
        problems: list[InputProblem] = []
        for name, value in static_inputs.items():
            spec = self.inputs.get(name)
            if spec is not None and spec.choices is not None and value not in spec.choices:
                allowed = ", ".join(str(c) for c in spec.choices)
                problems.append((name, "invalid_value", f"must be one of {allowed}"))
        return problems

    def spec_problems(self) -> list[str]:
        """What is wrong with this declaration (checked when it is registered)."""
        problems = []
        if not isinstance(self.type, str) or not self.type.strip():
            problems.append("type must be a non-empty string")
        for kind in ("inputs", "outputs"):
            ports = getattr(self, kind)
            if not isinstance(ports, Mapping):
                problems.append(f"{kind} must be a mapping of name to PortSpec")
                continue
            for name, spec in ports.items():
                if not isinstance(name, str) or not name:
                    problems.append(f"{kind} names must be non-empty strings")
                if not isinstance(spec, PortSpec):
                    problems.append(f"{kind}[{name!r}] must be a PortSpec")
        if isinstance(self.credits, bool) or not isinstance(self.credits, int) or self.credits < 0:
            problems.append("credits must be a non-negative integer")
        if not isinstance(self.timeout_seconds, int | float) or not self.timeout_seconds > 0:
            problems.append("timeout_seconds must be positive")
        if self.credential not in CREDENTIAL_MODES:
            problems.append("credential must be 'none', 'optional' or 'required'")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            problems.append("max_retries must be a non-negative integer")
        backoff = self.retry_backoff_seconds
        if not isinstance(backoff, int | float) or backoff < 0:
            problems.append("retry_backoff_seconds must be non-negative")
        if self.inline and not self.pure:
            problems.append("inline requires pure (an inline node starts before its phase commits)")
        return problems

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Check resolved inputs against the ports at run time; raise NodeError."""
        for name, spec in self.inputs.items():
            value = inputs.get(name)
            if value is None:
                if spec.required:
                    raise NodeError(f"input {name!r} is required")
                continue
            if not value_matches(spec.type, value):
                raise NodeError(f"input {name!r} must be {spec.type}, got {describe_type(value)}")

    def invoke(self, inputs: Mapping[str, Any], ctx: NodeContext) -> dict[str, Any]:
        """Check the inputs, ``run`` the node and check its outputs.

        This is what a worker calls. Exceptions that are not NodeError /
        TransientError escape unchanged (they are bugs, and the worker logs them).
        """
        ctx.check()
        values = dict(inputs)
        self.check_inputs(values)
        result = self.run(values, ctx)
        if not isinstance(result, Mapping):
            raise NodeError(f"node type {self.type!r} returned {describe_type(result)}")
        outputs = dict(result)
        for name, value in outputs.items():
            spec = self.outputs.get(name)
            if spec is not None and value is not None and not value_matches(spec.type, value):
                raise NodeError(
                    f"output {name!r} of node type {self.type!r} must be {spec.type}, "
                    f"got {describe_type(value)}"
                )
        return outputs

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (for the JSON schema and the API)."""
        return {
            "type": self.type,
            "description": self.description,
            "inputs": {name: spec.to_dict() for name, spec in self.inputs.items()},
            "outputs": {name: spec.to_dict() for name, spec in self.outputs.items()},
            "credits": self.credits,
            "timeout_seconds": self.timeout_seconds,
            "credential": self.credential,
            "retryable": self.retryable,
            "max_retries": self.max_retries,
            "retry_backoff_seconds": self.retry_backoff_seconds,
        }
