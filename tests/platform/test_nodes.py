"""Node types: registry, plugins, context, and the built-in nodes (HTTP ones against a
local server on 127.0.0.1, opened through OUTBOUND_ALLOWLIST)."""

from __future__ import annotations

import base64
import json
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.nodes import (
    NodeCancelled,
    NodeContext,
    NodeCredential,
    NodeError,
    NodeLogger,
    NodeTimeout,
    NodeType,
    PortSpec,
    TransientNodeError,
    UnknownNodeType,
    get_node_type,
    node_types,
    register_node_type,
    reset_node_types,
    unregister_node_type,
)
from flowbuilder.platform.settings import override_settings
from flowbuilder.platform.ssrf import OutboundBlocked, ResponseTooLarge

try:
    from tests.platform._http_server import LocalServer, local_server
except ImportError:  # pragma: no cover - rootdir-relative import mode
    from _http_server import LocalServer, local_server  # type: ignore[no-redef]

BUILTINS = {
    "http_request",
    "deliver_via_webhook",
    "extract_text_from_html",
    "read_property_from_json",
    "add_property_to_json",
    "delay",
}
SECRET = "s3cr3t-Value-42"


def make_ctx(
    credential: NodeCredential | None = None,
    seconds: float = 10.0,
    cancelled: Any = None,
) -> NodeContext:
    return NodeContext(
        execution_id="exec-1",
        user_id="user-1",
        node_id="n1",
        credential=credential,
        deadline=time.monotonic() + seconds,
        cancelled=cancelled,
    )


def run(type_name: str, ctx: NodeContext | None = None, **inputs: Any) -> dict[str, Any]:
    node_type = get_node_type(type_name)
    defaults = {k: s.default for k, s in node_type.inputs.items() if s.default is not None}
    return node_type.invoke({**defaults, **inputs}, ctx or make_ctx())


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as srv, override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]):
        yield srv


# --- registry -----------------------------------------------------------------------------


def test_builtins_registered_with_declared_costs() -> None:
    types = node_types()
    assert set(types) >= BUILTINS
    assert types["http_request"].credits == 2
    assert types["deliver_via_webhook"].credits == 2
    assert types["read_property_from_json"].credits == 1
    assert types["http_request"].credential == "optional"
    assert types["http_request"].retryable and types["http_request"].max_retries == 2
    assert types["delay"].timeout_seconds > 60  # room for MAX_DELAY_SECONDS
    with pytest.raises(TypeError):
        types["x"] = types["delay"]  # type: ignore[index]


def test_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(UnknownNodeType, match="unknown node type 'nope'.*http_request"):
        get_node_type("nope")


def test_register_and_refuse_duplicates() -> None:
    echo = NodeType(
        type="test_echo",
        inputs={"x": PortSpec("any", required=True)},
        outputs={"x": PortSpec("any")},
        run=lambda inputs, ctx: {"x": inputs["x"]},
    )
    register_node_type(echo)
    try:
        assert get_node_type("test_echo").invoke({"x": 3}, make_ctx()) == {"x": 3}
        with pytest.raises(ValueError, match="already registered"):
            register_node_type(NodeType(type="test_echo", run=lambda i, c: {}))
        with pytest.raises(ValueError, match="credits"):
            register_node_type(NodeType(type="test_bad", credits=-1))
    finally:
        unregister_node_type("test_echo")
    with pytest.raises(UnknownNodeType):
        get_node_type("test_echo")


PLUGIN_MODULE = """
from flowbuilder.platform.nodes import NodeType, PortSpec

class ShoutNode(NodeType):
    type = "plugin_shout"
    inputs = {"text": PortSpec("string", required=True)}
    outputs = {"text": PortSpec("string")}
    credits = 3

    def run(self, inputs, ctx):
        ctx.log.info("shouting")
        return {"text": inputs["text"].upper()}

INSTANCE = NodeType(type="plugin_instance", run=lambda inputs, ctx: {})

def make_factory_node():
    return NodeType(type="plugin_factory", credits=0, run=lambda inputs, ctx: {"ok": True})

def not_a_node():
    return 42
"""


def test_entry_point_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fake_flowbuilder_plugin_mod"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    dist = tmp_path / "fake_flowbuilder_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-flowbuilder-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[flowbuilder.nodes]\n"
        f"shout = {module}:ShoutNode\n"
        f"instance = {module}:INSTANCE\n"
        f"factory = {module}:make_factory_node\n"
        f"broken = {module}:does_not_exist\n"
        f"wrong = {module}:not_a_node\n"
        f"missing_module = no_such_module_xyz:Node\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_node_types()
    try:
        types = node_types()
        assert {"plugin_shout", "plugin_instance", "plugin_factory"} <= set(types)
        assert set(types) >= BUILTINS  # broken plugins skipped, built-ins intact
        ctx = make_ctx()
        assert get_node_type("plugin_shout").invoke({"text": "hi"}, ctx) == {"text": "HI"}
        assert ctx.log.entries[0].message == "shouting"
        assert types["plugin_shout"].credits == 3
    finally:
        sys.modules.pop(module, None)
        monkeypatch.undo()
        reset_node_types()
    assert "plugin_shout" not in node_types()


# --- context ----------------------------------------------------------------------------


def test_credential_repr_hides_secret() -> None:
    credential = NodeCredential(type="bearer_token", secret=SecretStr(SECRET), name="api")
    ctx = make_ctx(credential)
    assert SECRET not in repr(credential)
    assert SECRET not in repr(ctx)
    assert SECRET not in str(credential)


def test_logger_collects_and_bounds_entries() -> None:
    log = NodeLogger(max_entries=3)
    log.debug("a")
    log.info("b")
    log.warning("c")
    log.error("d")
    assert [(e.level, e.message) for e in log.entries] == [
        ("debug", "a"),
        ("info", "b"),
        ("warning", "c"),
    ]
    assert log.entries[0].timestamp.tzinfo is not None
    drained = log.drain()
    assert drained[-1].message == "1 log lines dropped (limit 3)"
    assert log.entries == []


def test_context_remaining_and_check() -> None:
    ctx = make_ctx(seconds=5)
    assert 4 < ctx.remaining() <= 5
    ctx.check()
    assert make_ctx(seconds=-1).remaining() == 0
    with pytest.raises(NodeTimeout):
        make_ctx(seconds=-1).check()
    with pytest.raises(NodeCancelled):
        make_ctx(cancelled=lambda: True).check()


def test_invoke_checks_input_and_output_types() -> None:
    with pytest.raises(NodeError, match="input 'html' must be html, got integer"):
        run("extract_text_from_html", html=5, selector="p")
    with pytest.raises(NodeError, match="input 'selector' is required"):
        run("extract_text_from_html", html="<p>x</p>")
    liar = NodeType(type="liar", outputs={"n": PortSpec("integer")}, run=lambda i, c: {"n": "x"})
    with pytest.raises(NodeError, match="output 'n'"):
        liar.invoke({}, make_ctx())


# --- HTML and JSON ------------------------------------------------------------------------

PAGE = """<html><head><style>p {color: red}</style></head><body>
<h1>  Title <b>here</b> </h1><ul><li>one</li><li>two</li></ul>
<div class="x">text<script>var hidden = 1;</script></div></body></html>"""


def test_extract_text() -> None:
    assert run("extract_text_from_html", html=PAGE, selector="h1") == {"text": "Title here"}
    assert run("extract_text_from_html", html=PAGE, selector="li", all=True) == {
        "text": ["one", "two"]
    }
    assert run("extract_text_from_html", html=PAGE, selector="div.x") == {"text": "text"}
    assert run("extract_text_from_html", html=PAGE, selector="table", all=True) == {"text": []}
    with pytest.raises(NodeError, match="matched nothing"):
        run("extract_text_from_html", html=PAGE, selector="table")
    with pytest.raises(NodeError, match="invalid CSS selector"):
        run("extract_text_from_html", html=PAGE, selector="li[")


DOC = {"items": [{"name": "a", "tags": ["x", "y"]}, {"name": "b"}], "count": 2, "a.b": 1}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("items.0.name", "a"),
        ("items[1].name", "b"),
        ("items.0.tags.1", "y"),
        ("items[0].tags[-1]", "y"),
        ("count", 2),
        ("items", DOC["items"]),
    ],
)
def test_read_property(path: str, expected: Any) -> None:
    assert run("read_property_from_json", json=DOC, property_path=path) == {"value": expected}


def test_read_property_parses_json_strings_and_reports_missing() -> None:
    text = json.dumps(DOC)
    assert run("read_property_from_json", json=text, property_path="items.1.name")["value"] == "b"
    with pytest.raises(NodeError, match="property 'items.5' not found"):
        run("read_property_from_json", json=DOC, property_path="items.5.name")
    with pytest.raises(NodeError, match="property 'nope' not found"):
        run("read_property_from_json", json=DOC, property_path="nope")
    with pytest.raises(NodeError, match="'count' is integer"):
        run("read_property_from_json", json=DOC, property_path="count.x")
    with pytest.raises(NodeError, match="not valid JSON"):
        run("read_property_from_json", json="{oops", property_path="a")
    with pytest.raises(NodeError, match="property_path"):
        run("read_property_from_json", json=DOC, property_path="a..b")


def test_add_property_returns_new_object() -> None:
    original = {"a": {"b": 1}, "list": [1, 2]}
    snapshot = json.loads(json.dumps(original))
    out = run("add_property_to_json", json=original, property_path="a.c", value={"d": [1]})
    assert out == {"json": {"a": {"b": 1, "c": {"d": [1]}}, "list": [1, 2]}}
    assert original == snapshot  # not mutated
    out = run("add_property_to_json", json=original, property_path="new.deep.key", value=True)
    assert out["json"]["new"] == {"deep": {"key": True}}
    assert run("add_property_to_json", json=original, property_path="list.2", value=3)["json"][
        "list"
    ] == [1, 2, 3]
    assert run("add_property_to_json", json='{"x": 1}', property_path="y")["json"] == {
        "x": 1,
        "y": None,
    }
    with pytest.raises(NodeError, match="cannot set 'a.b.c'"):
        run("add_property_to_json", json=original, property_path="a.b.c", value=1)
    with pytest.raises(NodeError, match="must be an object or a list"):
        run("add_property_to_json", json="3", property_path="a", value=1)


# --- delay --------------------------------------------------------------------------------


def test_delay_sleeps() -> None:
    start = time.monotonic()
    out = run("delay", seconds=0.15)
    assert 0.14 <= time.monotonic() - start < 1.0
    assert 0.14 <= out["slept_seconds"] < 1.0


def test_delay_clamped_by_setting_and_deadline() -> None:
    with override_settings(MAX_DELAY_SECONDS=0.1):
        ctx = make_ctx()
        out = run("delay", ctx=ctx, seconds=30)
        assert out["slept_seconds"] < 0.5
        assert "shortened" in ctx.log.entries[0].message
    with override_settings(MAX_DELAY_SECONDS=0.1):
        assert run("delay", seconds=10**400)["slept_seconds"] < 0.5  # huge value from an edge
    # A delay that would run past the node's deadline is a timeout, not a success.
    start = time.monotonic()
    with pytest.raises(NodeTimeout, match="deadline"):
        run("delay", ctx=make_ctx(seconds=0.2), seconds=30)
    assert time.monotonic() - start < 1.0


def test_delay_stops_when_cancelled() -> None:
    flag = threading.Event()
    threading.Timer(0.15, flag.set).start()
    start = time.monotonic()
    with pytest.raises(NodeCancelled):
        run("delay", ctx=make_ctx(cancelled=flag.is_set), seconds=20)
    assert time.monotonic() - start < 1.0


# --- HTTP -------------------------------------------------------------------------------


def test_http_get_json(server: LocalServer) -> None:
    server.route(
        "/data",
        body=b'{"items": [1, 2]}',
        headers={"Content-Type": "application/json; charset=utf-8", "X-Thing": "yes"},
    )
    out = run("http_request", url=server.url("/data?q=1"))
    assert out["status"] == 200
    assert out["body"] == {"items": [1, 2]}
    assert out["headers"]["x-thing"] == "yes"
    assert out["url"] == server.url("/data?q=1")
    assert server.requests[0].method == "GET"
    assert server.requests[0].path == "/data?q=1"


def test_http_text_body_and_custom_headers(server: LocalServer) -> None:
    server.route("/page", body="<p>héllo</p>".encode(), headers={"Content-Type": "text/html"})
    out = run(
        "http_request",
        url=server.url("/page"),
        method="put",
        headers={"X-Custom": "1", "Host": "evil.example"},
        body="raw text",
    )
    assert out["body"] == "<p>héllo</p>"
    received = server.requests[0]
    assert received.method == "PUT"
    assert received.body == b"raw text"
    assert received.headers["x-custom"] == "1"
    assert received.headers["host"] == f"127.0.0.1:{server.port}"  # user Host ignored


def test_http_json_body_is_sent_as_json(server: LocalServer) -> None:
    server.route("/in", status=201, body=b"created")
    out = run("http_request", url=server.url("/in"), method="POST", body={"a": [1, None]})
    assert out["status"] == 201
    assert json.loads(server.requests[0].body) == {"a": [1, None]}
    assert server.requests[0].headers["content-type"] == "application/json"


def test_webhook_posts_json(server: LocalServer) -> None:
    server.route("/hook", body=b'{"received": true}', headers={"Content-Type": "application/json"})
    out = run("deliver_via_webhook", url=server.url("/hook"), body={"event": "done", "n": 3})
    assert out == {"status": 200, "body": {"received": True}}
    received = server.requests[0]
    assert received.method == "POST"
    assert json.loads(received.body) == {"event": "done", "n": 3}
    assert received.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("kind", "secret", "extra", "header", "expected"),
    [
        ("bearer_token", SECRET, {}, "authorization", f"Bearer {SECRET}"),
        (
            "basic_auth",
            f"alice:{SECRET}",
            {},
            "authorization",
            "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode(),
        ),
        ("api_key", SECRET, {}, "x-api-key", SECRET),
        ("api_key", SECRET, {"api_key_header": "X-Token"}, "x-token", SECRET),
        ("header", f"X-Service-Key: {SECRET}", {}, "x-service-key", SECRET),
    ],
)
@pytest.mark.parametrize("type_name", ["http_request", "deliver_via_webhook"])
def test_credentials_become_headers(
    server: LocalServer,
    type_name: str,
    kind: str,
    secret: str,
    extra: dict[str, str],
    header: str,
    expected: str,
) -> None:
    server.route("/auth", body=b"ok")
    credential = NodeCredential(type=kind, secret=SecretStr(secret), name="cred")
    inputs: dict[str, Any] = {"url": server.url("/auth"), **extra}
    if type_name == "deliver_via_webhook":
        inputs["body"] = {}
    run(type_name, ctx=make_ctx(credential), **inputs)
    assert server.requests[0].headers[header] == expected


def test_errors_never_show_the_credential(server: LocalServer) -> None:
    server.route("/denied", status=401, body=f"bad token {SECRET}".encode())
    credential = NodeCredential(type="bearer_token", secret=SecretStr(SECRET), name="cred")
    with pytest.raises(NodeError) as info:
        run("http_request", ctx=make_ctx(credential), url=server.url("/denied"))
    assert not isinstance(info.value, TransientError)
    assert "401" in str(info.value)
    assert SECRET not in str(info.value)
    broken = NodeCredential(type="bearer_token", secret=SecretStr(f"{SECRET}\r\nX: y"), name="c")
    with pytest.raises(NodeError) as info:
        run("http_request", ctx=make_ctx(broken), url=server.url("/denied"))
    assert SECRET not in str(info.value)
    odd = NodeCredential(type="basic_auth", secret=SecretStr(SECRET), name="c")  # no colon
    with pytest.raises(NodeError) as info:
        run("http_request", ctx=make_ctx(odd), url=server.url("/denied"))
    assert SECRET not in str(info.value)
    unknown = NodeCredential(type="oauth_dance", secret=SecretStr(SECRET), name="c")
    with pytest.raises(NodeError, match="oauth_dance") as info:
        run("http_request", ctx=make_ctx(unknown), url=server.url("/denied"))
    assert SECRET not in str(info.value)


def test_credential_dropped_on_cross_origin_redirect(server: LocalServer) -> None:
    with local_server() as other:
        other.route("/landing", body=b"ok")
        server.route("/go", status=302, headers={"Location": other.url("/landing")})
        credential = NodeCredential(type="api_key", secret=SecretStr(SECRET), name="cred")
        out = run(
            "http_request",
            ctx=make_ctx(credential),
            url=server.url("/go"),
            headers={"Authorization": "Basic xyz", "X-Plain": "kept"},
        )
        assert out["url"] == other.url("/landing")
        assert server.requests[0].headers["x-api-key"] == SECRET
        landed = other.requests[0].headers
        assert "x-api-key" not in landed
        assert "authorization" not in landed
        assert landed["x-plain"] == "kept"


def test_redirects_followed_and_post_becomes_get(server: LocalServer) -> None:
    server.route("/a", status=301, headers={"Location": "/b"})
    server.route("/b", status=303, headers={"Location": server.url("/c")})
    server.route("/c", body=b'{"done": 1}', headers={"Content-Type": "application/json"})
    out = run("http_request", url=server.url("/a"), method="POST", body={"x": 1})
    assert out["body"] == {"done": 1}
    assert out["url"] == server.url("/c")
    assert [(r.method, r.path) for r in server.requests] == [
        ("POST", "/a"),
        ("GET", "/b"),
        ("GET", "/c"),
    ]
    assert server.requests[-1].body == b""


def test_too_many_redirects(server: LocalServer) -> None:
    server.route("/loop", status=302, headers={"Location": "/loop"})
    with override_settings(HTTP_MAX_REDIRECTS=3), pytest.raises(NodeError, match="too many"):
        run("http_request", url=server.url("/loop"))
    assert len(server.requests) == 4  # the first request and three redirects


@pytest.mark.parametrize("send_length", [True, False])
def test_response_size_cap(server: LocalServer, send_length: bool) -> None:
    server.route("/big", body=b"x" * 50_000, send_length=send_length, chunk=4096)
    server.route("/small", body=b"y" * 1000)
    with override_settings(HTTP_MAX_RESPONSE_BYTES=2048):
        with pytest.raises(ResponseTooLarge, match="2048"):
            run("http_request", url=server.url("/big"))
        assert run("http_request", url=server.url("/small"))["body"] == "y" * 1000


def test_timeout_is_transient(server: LocalServer) -> None:
    server.route("/slow", body=b"late", delay=2.0)
    start = time.monotonic()
    with override_settings(HTTP_TIMEOUT_SECONDS=0.3), pytest.raises(NodeTimeout) as info:
        run("http_request", url=server.url("/slow"))
    assert isinstance(info.value, TransientError)
    assert time.monotonic() - start < 1.5


def test_node_deadline_caps_http_time(server: LocalServer) -> None:
    server.route("/slow", body=b"late", delay=2.0)
    start = time.monotonic()
    with pytest.raises(NodeTimeout):
        run("http_request", ctx=make_ctx(seconds=0.3), url=server.url("/slow"))
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_5xx_is_transient(server: LocalServer, status: int) -> None:
    server.route("/fail", status=status, body=b"oops")
    with pytest.raises(TransientNodeError, match=str(status)) as info:
        run("http_request", url=server.url("/fail"))
    assert isinstance(info.value, TransientError)


def test_4xx_is_permanent(server: LocalServer) -> None:
    with pytest.raises(NodeError, match="404") as info:
        run("http_request", url=server.url("/missing"))
    assert not isinstance(info.value, TransientError)


def test_connection_refused_is_transient(server: LocalServer) -> None:
    with local_server() as gone:
        url = gone.url("/")
    with pytest.raises(TransientNodeError, match="could not connect"):
        run("http_request", url=url)


def test_http_nodes_refuse_blocked_urls() -> None:
    with pytest.raises(OutboundBlocked):
        run("http_request", url="http://127.0.0.1:1/")
    with pytest.raises(OutboundBlocked):
        run("deliver_via_webhook", url="http://169.254.169.254/", body={})


def test_invalid_headers_refused(server: LocalServer) -> None:
    with pytest.raises(NodeError, match="line break"):
        run("http_request", url=server.url("/"), headers={"X-A": "1\r\nX-B: 2"})
    with pytest.raises(NodeError, match="invalid header name"):
        run("http_request", url=server.url("/"), headers={"Bad Name": "1"})
    assert server.requests == []
