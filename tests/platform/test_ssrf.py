"""Outbound safety: refused addresses, DNS checks, pinning, allowlist, redirects."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from flowbuilder.platform import ssrf
from flowbuilder.platform.errors import TransientError
from flowbuilder.platform.nodes import NodeContext, NodeError, TransientNodeError
from flowbuilder.platform.settings import override_settings
from flowbuilder.platform.ssrf import OutboundBlocked, blocked_reason, outbound_request, vet_url

try:
    from tests.platform._http_server import LocalServer, local_server
except ImportError:  # pragma: no cover - rootdir-relative import mode
    from _http_server import LocalServer, local_server  # type: ignore[no-redef]


def make_ctx(seconds: float = 10.0) -> NodeContext:
    return NodeContext(
        execution_id="exec-1",
        user_id="user-1",
        node_id="fetch",
        deadline=time.monotonic() + seconds,
    )


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as srv:
        yield srv


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Replace DNS: hostnames resolve to what the test puts in the returned dict."""
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    monkeypatch.setattr(ssrf, "resolve_host", resolve)
    table["__calls__"] = calls  # type: ignore[assignment]
    return table


BLOCKED_URLS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/admin", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://100.100.100.200/", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade"),
    ("http://[::1]/", "loopback"),
    ("http://[fc00::1]/", "private"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:169.254.169.254]/", "IPv4-mapped"),
    ("http://[2002:7f00:1::]/", "6to4"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://2130706433/", "loopback"),  # decimal 127.0.0.1
    ("http://0x7f.1/", "loopback"),  # hex + short form
    ("http://017700000001/", "loopback"),  # octal
    ("http://127.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),  # trailing dot
]


@pytest.mark.parametrize(("url", "why"), BLOCKED_URLS)
def test_literal_addresses_are_refused(url: str, why: str, fake_dns: dict) -> None:
    with pytest.raises(OutboundBlocked) as info:
        vet_url(url)
    assert why in str(info.value)
    assert fake_dns["__calls__"] == []  # literals never go to DNS


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(address) is None


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "javascript:x"]
)
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(OutboundBlocked, match="scheme"):
        vet_url(url)


def test_credentials_in_url_refused(fake_dns: dict) -> None:
    fake_dns["example.com"] = ["93.184.216.34"]
    with pytest.raises(OutboundBlocked, match="embedded credentials"):
        vet_url("http://user:secret@example.com/")
    with pytest.raises(OutboundBlocked, match="embedded credentials"):
        vet_url("http://example.com\\@evil.example/")


@pytest.mark.parametrize(
    "url", ["http://a%20b/", "http:///path", "http://[::1/", "//example.com/", "example.com"]
)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(NodeError):
        vet_url(url)


def test_hostname_resolving_to_private_address(fake_dns: dict) -> None:
    fake_dns["intranet.example"] = ["10.1.2.3"]
    with pytest.raises(OutboundBlocked) as info:
        vet_url("https://intranet.example/")
    assert "intranet.example" in str(info.value)
    assert "10.1.2.3 is a private address" in str(info.value)


def test_every_resolved_address_must_be_public(fake_dns: dict) -> None:
    fake_dns["mixed.example"] = ["93.184.216.34", "192.168.0.10"]
    with pytest.raises(OutboundBlocked, match="192.168.0.10"):
        vet_url("http://mixed.example/")


def test_public_hostname_is_pinned_to_vetted_address(fake_dns: dict) -> None:
    fake_dns["public.example"] = ["93.184.216.34"]
    target = vet_url("http://public.example:8080/a?b=1")
    assert target.address == "93.184.216.34"
    assert str(target.connect_url) == "http://93.184.216.34:8080/a?b=1"
    assert target.host_header == "public.example:8080"


def test_real_localhost_is_refused() -> None:
    with pytest.raises(OutboundBlocked, match="loopback"):
        vet_url("http://localhost:8000/")


def test_dns_failures(fake_dns: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NodeError, match="could not resolve") as info:
        vet_url("http://no-such-host.example/")
    assert not isinstance(info.value, TransientError)

    def flaky(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(ssrf, "resolve_host", flaky)
    with pytest.raises(TransientNodeError):
        vet_url("http://flaky.example/")


# --- allowlist --------------------------------------------------------------------------


def test_allowlist_opens_exactly_the_listed_host(fake_dns: dict) -> None:
    with override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]):
        assert vet_url("http://127.0.0.1:9999/").address == "127.0.0.1"
        for url in ("http://127.0.0.2/", "http://10.0.0.1/", "http://[::1]/"):
            with pytest.raises(OutboundBlocked):
                vet_url(url)
        with pytest.raises(OutboundBlocked):  # resolves to 127.0.0.1, but is another host
            fake_dns["localhost"] = ["127.0.0.1"]
            vet_url("http://localhost/")


def test_allowlist_with_port(fake_dns: dict) -> None:
    with override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1:8080", "[::1]:9000"]):
        vet_url("http://127.0.0.1:8080/")
        vet_url("http://[::1]:9000/")
        with pytest.raises(OutboundBlocked):
            vet_url("http://127.0.0.1:8081/")
        with pytest.raises(OutboundBlocked):
            vet_url("http://[::1]:9001/")


def test_allowlisted_hostname_may_resolve_privately_but_not_to_metadata(fake_dns: dict) -> None:
    fake_dns["svc.internal"] = ["10.0.0.5"]
    fake_dns["meta.internal"] = ["169.254.169.254"]
    with override_settings(OUTBOUND_ALLOWLIST=["svc.internal", "meta.internal"]):
        assert vet_url("http://svc.internal/").address == "10.0.0.5"
        with pytest.raises(OutboundBlocked, match="metadata"):
            vet_url("http://meta.internal/")
    with pytest.raises(OutboundBlocked):  # and without the allowlist, refused again
        vet_url("http://svc.internal/")


def test_static_check_codes() -> None:
    assert ssrf.check_url_static("https://example.com/") is None
    assert ssrf.check_url_static("http://10.0.0.1/")[0] == "blocked_url"
    assert ssrf.check_url_static("ftp://example.com/")[0] == "blocked_url"
    assert ssrf.check_url_static("http://a%20b/")[0] == "invalid_value"
    with override_settings(OUTBOUND_ALLOWLIST=["10.0.0.1"]):
        assert ssrf.check_url_static("http://10.0.0.1/") is None


# --- requests -----------------------------------------------------------------------------


def test_connection_is_pinned_to_vetted_address(server: LocalServer, fake_dns: dict) -> None:
    """httpx never resolves the name itself: if it did, 'rebind.test' would not resolve
    here (or could resolve elsewhere). The server sees the original Host header."""
    server.route("/", body=b"ok")
    fake_dns["rebind.test"] = ["127.0.0.1"]
    with override_settings(OUTBOUND_ALLOWLIST=["rebind.test"]):
        response = outbound_request("GET", f"http://rebind.test:{server.port}/", ctx=make_ctx())
    assert response.status == 200
    assert response.content == b"ok"
    assert response.url == f"http://rebind.test:{server.port}/"
    assert server.requests[0].headers["host"] == f"rebind.test:{server.port}"
    assert fake_dns["__calls__"] == ["rebind.test"]


def test_https_sends_sni_and_host_for_original_name(
    fake_dns: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns["secure.example"] = ["93.184.216.34"]
    seen: list[httpx.Request] = []

    def fake_send(self: httpx.Client, request: httpx.Request, **kwargs: object) -> None:
        seen.append(request)
        raise httpx.ConnectError("refused", request=request)

    monkeypatch.setattr(httpx.Client, "send", fake_send)
    with pytest.raises(TransientNodeError):
        outbound_request("GET", "https://secure.example/x", ctx=make_ctx())
    (request,) = seen
    assert request.url.host == "93.184.216.34"
    assert request.headers["host"] == "secure.example"
    assert request.extensions["sni_hostname"] == "secure.example"


def test_redirect_to_metadata_is_refused(server: LocalServer) -> None:
    server.route(
        "/go", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
    )
    with (
        override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]),
        pytest.raises(OutboundBlocked, match="metadata"),
    ):
        outbound_request("GET", server.url("/go"), ctx=make_ctx())
    assert len(server.requests) == 1


def test_redirect_to_non_allowlisted_local_port_is_refused(server: LocalServer) -> None:
    with local_server() as other:
        other.route("/secret", body=b"internal")
        server.route("/go", status=307, headers={"Location": other.url("/secret")})
        with (
            override_settings(OUTBOUND_ALLOWLIST=[f"127.0.0.1:{server.port}"]),
            pytest.raises(OutboundBlocked, match="loopback"),
        ):
            outbound_request("GET", server.url("/go"), ctx=make_ctx())
        assert other.requests == []  # never contacted


def test_redirect_to_other_loopback_address_is_refused(server: LocalServer) -> None:
    server.route("/go", status=301, headers={"Location": f"http://127.0.0.2:{server.port}/"})
    with (
        override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]),
        pytest.raises(OutboundBlocked, match="127.0.0.2"),
    ):
        outbound_request("GET", server.url("/go"), ctx=make_ctx())


def test_redirect_to_other_scheme_is_refused(server: LocalServer) -> None:
    server.route("/go", status=302, headers={"Location": "file:///etc/passwd"})
    with (
        override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]),
        pytest.raises(OutboundBlocked, match="scheme"),
    ):
        outbound_request("GET", server.url("/go"), ctx=make_ctx())


def test_direct_request_to_blocked_address_never_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_send(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not connect")

    monkeypatch.setattr(httpx.Client, "send", no_send)
    with pytest.raises(OutboundBlocked):
        outbound_request("GET", "http://169.254.169.254/", ctx=make_ctx())
