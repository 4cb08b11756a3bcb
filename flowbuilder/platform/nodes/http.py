"""Node types that call out over HTTP: ``http_request`` and ``deliver_via_webhook``.

Both go through :func:`flowbuilder.platform.ssrf.outbound_request` (SSRF checks,
pinned connections, size and time caps). 5xx, 408, 429, connection errors and
timeouts raise TransientNodeError (retried); other failures raise NodeError. No
message ever contains a credential value.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from flowbuilder.platform import ssrf
from flowbuilder.platform.nodes.base import (
    InputProblem,
    NodeContext,
    NodeCredential,
    NodeError,
    NodeType,
    PortSpec,
    TransientNodeError,
)

logger = structlog.get_logger(__name__)

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
CREDENTIAL_TYPES = ("bearer_token", "basic_auth", "api_key", "header")
DEFAULT_API_KEY_HEADER = "X-API-Key"
_TRANSIENT_STATUSES = frozenset({408, 425, 429})


def credential_headers(
    credential: NodeCredential | None, api_key_header: str | None = None
) -> dict[str, str]:
    """The request header(s) a credential turns into, by credential type.

    ``bearer_token`` -> ``Authorization: Bearer <v>``; ``basic_auth`` (``user:password``)
    -> ``Authorization: Basic ...``; ``api_key`` -> ``X-API-Key: <v>`` (or the header
    named by ``api_key_header``); ``header`` (``Name: value``) -> that header.
    """
    if credential is None:
        return {}
    value = credential.secret.get_secret_value()
    kind = credential.type
    if kind == "bearer_token":
        name, header_value = "Authorization", f"Bearer {value.strip()}"
    elif kind == "basic_auth":
        if ":" not in value:
            raise NodeError(f"credential {credential.name!r}: basic_auth must be 'user:password'")
        token = base64.b64encode(value.encode("utf-8")).decode("ascii")
        name, header_value = "Authorization", f"Basic {token}"
    elif kind == "api_key":
        name, header_value = api_key_header or DEFAULT_API_KEY_HEADER, value.strip()
    elif kind == "header":
        name, sep, header_value = value.partition(":")
        if not sep or not name.strip():
            raise NodeError(f"credential {credential.name!r}: header must be 'Name: value'")
        name, header_value = name.strip(), header_value.strip()
    else:
        allowed = ", ".join(CREDENTIAL_TYPES)
        raise NodeError(
            f"credential {credential.name!r} has type {kind!r}, which HTTP nodes cannot use "
            f"(use one of {allowed})"
        )
    try:
        return dict([ssrf.check_header(name, header_value, secret=True)])
    except NodeError:
        raise NodeError(f"credential {credential.name!r} does not make a valid header") from None


def _user_headers(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise NodeError("input 'headers' must be an object of header names to values")
    return dict(ssrf.check_header(name, value) for name, value in raw.items())


def _static_header_problems(raw: Any) -> list[InputProblem]:
    try:
        _user_headers(raw)
    except NodeError as exc:
        return [("headers", "invalid_value", str(exc))]
    return []


def _send(
    method: str,
    url: str,
    ctx: NodeContext,
    headers: dict[str, str],
    content: bytes | None,
    api_key_header: str | None,
) -> ssrf.OutboundResponse:
    secret_headers = credential_headers(ctx.credential, api_key_header)
    # The credential wins over a user header of the same name (case-insensitive).
    taken = {name.lower() for name in secret_headers}
    merged = {k: v for k, v in headers.items() if k.lower() not in taken}
    merged.update(secret_headers)
    response = ssrf.outbound_request(
        method,
        url,
        ctx=ctx,
        headers=merged,
        content=content,
        sensitive_headers=secret_headers.keys(),
    )
    status = response.status
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise TransientNodeError(f"{method} {_safe_host(response.url)} answered HTTP {status}")
    if status >= 400:
        raise NodeError(f"{method} {_safe_host(response.url)} answered HTTP {status}")
    for line in response.redirects:
        ctx.log.info(f"redirected to {_safe_host(line)}")
    return response


def _safe_host(url: str) -> str:
    try:
        return httpx.URL(url).host or url
    except Exception:
        return "(invalid URL)"


def _decode_body(response: ssrf.OutboundResponse) -> Any:
    if response.is_json and response.content:
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError):
            pass  # a server lying about its content type: return the text
    return response.text()


def _url_problems(static_inputs: Mapping[str, Any]) -> list[InputProblem]:
    url = static_inputs.get("url")
    if url is None:
        return []
    found = ssrf.check_url_static(url)
    return [("url", found[0], found[1])] if found else []


_HEADERS = PortSpec("json", description="request headers, an object of name to value")
_API_KEY_HEADER = PortSpec(
    "string", description="header name for an api_key credential (default X-API-Key)"
)


class _OutboundNode(NodeType):
    """What every node that calls out over HTTP shares: cost, limits, retries, checks."""

    credits = 2
    timeout_seconds = 60.0
    credential = "optional"
    # 5xx, 408, 425, 429 and connection errors are transient; retried inside the phase.
    retryable = True
    max_retries = 2
    retry_backoff_seconds = 2.0

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        problems = _url_problems(static_inputs)
        if "headers" in static_inputs:
            problems += _static_header_problems(static_inputs["headers"])
        return problems


class HttpRequestNode(_OutboundNode):
    type = "http_request"
    description = "Call a URL. JSON responses are parsed; others are returned as text."
    inputs = {
        "method": PortSpec("string", default="GET", choices=HTTP_METHODS),
        "url": PortSpec("string", required=True, description="http or https URL"),
        "headers": _HEADERS,
        "body": PortSpec("json", description="a string is sent as is; other values as JSON"),
        "api_key_header": _API_KEY_HEADER,
    }
    outputs = {
        "status": PortSpec("integer"),
        "headers": PortSpec("json"),
        "body": PortSpec("any", description="parsed JSON when the response is JSON, else text"),
        "url": PortSpec("string", description="the final URL, after redirects"),
    }

    def check_static_inputs(self, static_inputs: Mapping[str, Any]) -> list[InputProblem]:
        problems = super().check_static_inputs(static_inputs)
        method = static_inputs.get("method")
        if method is not None and method.upper() not in HTTP_METHODS:
            allowed = ", ".join(HTTP_METHODS)
            problems.append(("method", "invalid_value", f"must be one of {allowed}"))
        return problems

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        method = str(inputs.get("method") or "GET").upper()
        if method not in HTTP_METHODS:
            raise NodeError(f"input 'method' must be one of {', '.join(HTTP_METHODS)}")
        headers = _user_headers(inputs.get("headers"))
        body = inputs.get("body")
        content: bytes | None = None
        if isinstance(body, str):
            content = body.encode("utf-8")
        elif body is not None:
            content = _json_bytes(body)
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        response = _send(method, inputs["url"], ctx, headers, content, inputs.get("api_key_header"))
        return {
            "status": response.status,
            "headers": response.headers,
            "body": _decode_body(response),
            "url": response.url,
        }


def _json_bytes(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        raise NodeError("input 'body' is not JSON-serializable") from None


class DeliverViaWebhookNode(_OutboundNode):
    type = "deliver_via_webhook"
    description = "POST a JSON body to a URL."
    inputs = {
        "url": PortSpec("string", required=True, description="http or https URL"),
        "body": PortSpec("json", required=True, description="sent as JSON"),
        "headers": _HEADERS,
        "api_key_header": _API_KEY_HEADER,
    }
    outputs = {
        "status": PortSpec("integer"),
        "body": PortSpec("any", description="parsed JSON when the response is JSON, else text"),
    }

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
        headers = _user_headers(inputs.get("headers"))
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        headers["Content-Type"] = "application/json"
        content = _json_bytes(inputs.get("body"))
        response = _send("POST", inputs["url"], ctx, headers, content, inputs.get("api_key_header"))
        return {"status": response.status, "body": _decode_body(response)}


HTTP_TYPES: list[NodeType] = [HttpRequestNode(), DeliverViaWebhookNode()]
