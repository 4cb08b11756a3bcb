"""Domain errors, in one place so the API can map each to a status code.

Infrastructure exceptions (SQLAlchemy, botocore, kombu) are wrapped at the boundary
with ``raise DomainError(...) from exc`` so callers never depend on a driver's types.
Messages never contain a secret value.
"""

from __future__ import annotations

from typing import Any


class FlowBuilderError(Exception):
    """Base class of every error the execution core raises on purpose."""


class ConfigurationError(FlowBuilderError):
    """A setting is missing or invalid. The message names the variable, never its value."""


class NotFound(FlowBuilderError):
    """The object does not exist, or belongs to another user (the two look the same)."""

    def __init__(self, kind: str, object_id: Any) -> None:
        self.kind = kind
        self.object_id = object_id
        super().__init__(f"{kind} {object_id} not found")


class Conflict(FlowBuilderError):
    """The request contradicts the current state (duplicate, illegal transition)."""


class InvalidTransition(Conflict):
    def __init__(self, kind: str, object_id: Any, current: Any, target: Any) -> None:
        self.current = current
        self.target = target
        super().__init__(
            f"{kind} {object_id} cannot move from {getattr(current, 'value', current)} "
            f"to {getattr(target, 'value', target)}"
        )


class InsufficientCredits(FlowBuilderError):
    def __init__(self, user_id: Any, needed: int, available: int | None = None) -> None:
        self.user_id = user_id
        self.needed = needed
        self.available = available
        detail = f"{needed} credits needed"
        if available is not None:
            detail += f", {available} available"
        super().__init__(f"insufficient credits for user {user_id}: {detail}")


class RateLimited(FlowBuilderError):
    def __init__(self, key: str, limit: int, retry_after: float) -> None:
        self.key = key
        self.limit = limit
        self.retry_after = retry_after
        super().__init__(
            f"rate limit of {limit} per window exceeded for {key}; retry after {retry_after:.0f}s"
        )


class TransientError(FlowBuilderError):
    """A failure that may succeed if tried again (network blip, database restart)."""


class ValidationFailed(FlowBuilderError):
    """User input is invalid. ``problems`` lists each one with its path."""

    def __init__(self, problems: list[Any], what: str = "input") -> None:
        self.problems = problems
        lines = "; ".join(str(p) for p in problems[:20])
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"invalid {what}: {lines}{more}")


class SecretError(FlowBuilderError):
    """A secret could not be stored, decrypted or retrieved. Never carries the value."""


class SecretsUnavailable(SecretError, TransientError):
    """The secrets backend could not be reached or asked us to slow down: trying again
    later may succeed (a worker retries the run instead of failing it)."""


# --- node errors ------------------------------------------------------------------------
# Raised by node types and by the outbound HTTP guard (``ssrf``). They live here, not in
# ``nodes.base`` (which re-exports them), so that ``ssrf`` needs nothing from the
# ``nodes`` package and ``nodes.http`` can import ``ssrf`` without an import cycle.


class NodeError(FlowBuilderError):
    """A node failed permanently (bad input, 4xx answer, ...). Retrying will not help.

    Messages are shown to the workflow's owner and never contain a credential value.
    """


class TransientNodeError(NodeError, TransientError):
    """A node failed in a way that may pass on a retry (5xx, connection reset, timeout)."""


class NodeTimeout(TransientNodeError):
    """The node ran out of time (its own deadline, or an outbound call's timeout)."""


class NodeCancelled(NodeError):
    """The execution was cancelled while the node was running."""
