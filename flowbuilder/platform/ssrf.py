"""Outbound HTTP for nodes, safe against server-side request forgery (SSRF).

Every node that calls a URL goes through :func:`outbound_request`, which:

* accepts only ``http``/``https`` URLs without ``user:password@``;
* resolves the host (:func:`resolve_host`, monkeypatchable) and refuses the request
  unless EVERY resolved address is public: loopback, private (RFC 1918, ULA),
  link-local, CGNAT, multicast, unspecified, reserved, documentation, and the cloud
  metadata addresses are refused, including IPv4-mapped / 6to4 / Teredo IPv6 forms
  and legacy IPv4 spellings such as ``http://2130706433/``;
* pins the connection to the vetted address (the URL's host becomes the IP, with the
  ``Host`` header and, for https, the TLS SNI/certificate name set to the original
  host), so a DNS answer that changes between check and connect cannot redirect it;
* follows redirects itself, vetting each hop again, at most ``HTTP_MAX_REDIRECTS``,
  dropping credentials when a redirect leaves the origin;
* caps the time at ``min(HTTP_TIMEOUT_SECONDS, ctx.remaining())`` and the (decoded)
  response size at ``HTTP_MAX_RESPONSE_BYTES``.

``OUTBOUND_ALLOWLIST`` (``host`` or ``host:port`` entries) opens exactly those hosts,
whatever they resolve to; cloud metadata addresses stay closed unless the entry names
the metadata IP itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpcore
import httpx
import structlog

from flowbuilder.platform.errors import NodeError, NodeTimeout, TransientNodeError
from flowbuilder.platform.settings import get_settings
from flowbuilder.platform.threadpools import ThreadPool

logger = structlog.get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Legacy IPv4 spellings that inet_aton accepts: 2130706433, 0x7f.1, 017700000001, 127.1
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$", re.I)
_HOSTNAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the client computes itself, or that would let a caller undo the pinning.
_MANAGED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
# Dropped when a redirect leaves the origin (httpx and browsers do the same).
_ORIGIN_BOUND_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class OutboundBlocked(NodeError):
    """The URL may not be called (scheme, embedded credentials, or a refused address)."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"outbound request to {host!r} blocked: {reason}")


class ResponseTooLarge(NodeError):
    """The response exceeded HTTP_MAX_RESPONSE_BYTES; the download was stopped."""


# --- addresses --------------------------------------------------------------------------


def resolve_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` to IP address strings. Tests monkeypatch this function.

    Raises ``socket.gaierror`` (an OSError) when the name does not resolve.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


def blocked_reason(address: IPAddress | str) -> str | None:
    """Why ``address`` may not be called, or None if it is a public address."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return "not a valid IP address"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[tuple[str, ipaddress.IPv4Address]] = []
        if ip.ipv4_mapped is not None:
            embedded.append(("IPv4-mapped", ip.ipv4_mapped))
        if ip.sixtofour is not None:
            embedded.append(("6to4", ip.sixtofour))
        if ip.teredo is not None:
            embedded.extend(("Teredo", part) for part in ip.teredo)
        for kind, inner in embedded:
            reason = blocked_reason(inner)
            if reason:
                return f"{ip} is an {kind} form of a refused address ({reason})"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.version == 4 and ip in _CGNAT, "a carrier-grade NAT address (100.64.0.0/10)"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, what in checks:
        if hit:
            return f"{ip} is {what}"
    return None


def _literal_ip(host: str) -> IPAddress | None:
    """The IP a host names literally (any spelling inet_aton accepts), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise OutboundBlocked(host, "not a valid IPv4 address") from None
    return None


def _parse_allow_entry(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    host, port = entry, None
    if entry.startswith("["):
        inner, _, rest = entry[1:].partition("]")
        host = inner
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif entry.count(":") == 1:
        name, _, port_text = entry.partition(":")
        if port_text.isdigit():
            host, port = name, int(port_text)
    host = host.rstrip(".")
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return host, port


def is_allowlisted(host: str, port: int, allowlist: Iterable[str] | None = None) -> bool:
    """Whether ``host`` (normalized) and ``port`` match an OUTBOUND_ALLOWLIST entry."""
    entries = get_settings().OUTBOUND_ALLOWLIST if allowlist is None else allowlist
    for entry in entries:
        allowed_host, allowed_port = _parse_allow_entry(entry)
        if allowed_host == host and (allowed_port is None or allowed_port == port):
            return True
    return False


# --- URLs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundTarget:
    """A vetted URL and the address the connection is pinned to."""

    url: httpx.URL  # as the user wrote it (normalized); used for joins and the Host header
    host: str  # normalized host: lowercase ASCII, no trailing dot, IPs in canonical form
    port: int
    address: str  # the vetted IP the connection goes to

    @property
    def connect_url(self) -> httpx.URL:
        return self.url.copy_with(host=self.address)

    @property
    def host_header(self) -> str:
        host = self.url.raw_host.decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        if self.url.port is not None:
            host += f":{self.url.port}"
        return host

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.url.scheme, self.host, self.port)


@dataclass(frozen=True, slots=True)
class _ParsedUrl:
    url: httpx.URL
    host: str
    port: int
    literal: IPAddress | None


def _parse(url: str | httpx.URL) -> _ParsedUrl:
    if not isinstance(url, httpx.URL | str):
        raise NodeError("URL must be a string")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise NodeError(f"invalid URL: {exc}") from None
    scheme = parsed.scheme
    if not scheme:
        raise NodeError("invalid URL: it must start with http:// or https://")
    if scheme not in _DEFAULT_PORTS:
        raise OutboundBlocked(
            parsed.host or "(no host)", f"scheme {scheme or '(none)'!r} is not http or https"
        )
    try:
        raw_host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        raise NodeError("invalid URL: host is not valid") from None
    if not raw_host:
        raise NodeError("invalid URL: no host")
    if parsed.userinfo:
        raise OutboundBlocked(raw_host, "URLs with embedded credentials are refused")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise NodeError(f"invalid URL: port {port} out of range")
    literal = _literal_ip(raw_host)
    if literal is not None:
        host = str(literal)
    elif _HOSTNAME.match(raw_host) and ".." not in raw_host:
        host = raw_host
    else:
        raise NodeError(f"invalid URL: invalid host {raw_host!r}")
    return _ParsedUrl(parsed, host, port, literal)


def _vet_addresses(host: str, port: int, addresses: list[IPAddress], literal: bool) -> None:
    allowlisted = is_allowlisted(host, port)
    for ip in addresses:
        if allowlisted:
            # The allowlist names hosts; it never opens the metadata service by accident.
            if ip in METADATA_ADDRESSES and not (literal and str(ip) == host):
                raise OutboundBlocked(host, f"{ip} is a cloud metadata address")
            continue
        reason = blocked_reason(ip)
        if reason:
            raise OutboundBlocked(host, reason)


def check_url_static(url: Any) -> tuple[str, str] | None:
    """A definition-time check with no DNS: ``(code, message)`` for a bad ``url``, or None.

    Catches bad schemes, embedded credentials, malformed hosts (``invalid_value``) and
    refused literal IPs (``blocked_url``). Hostnames are only vetted at run time, after
    resolution, because DNS answers change.
    """
    try:
        parsed = _parse(url)
        if parsed.literal is not None:
            _vet_addresses(parsed.host, parsed.port, [parsed.literal], literal=True)
    except OutboundBlocked as exc:
        return "blocked_url", str(exc)
    except NodeError as exc:
        return "invalid_value", str(exc)
    return None


def vet_url(url: str | httpx.URL, *, deadline: float | None = None) -> OutboundTarget:
    """Parse, resolve and check ``url``; return it with the address to connect to.

    Raises OutboundBlocked (refused), NodeError (malformed, unknown host),
    TransientNodeError (temporary DNS failure) or NodeTimeout (DNS still unanswered at
    ``deadline``, a ``time.monotonic()`` value).
    """
    parsed = _parse(url)
    if parsed.literal is not None:
        addresses: list[IPAddress] = [parsed.literal]
    else:
        try:
            if deadline is None:
                resolved = resolve_host(parsed.host, parsed.port)
            else:
                resolved = _resolve_before(parsed.host, parsed.port, deadline)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise TransientNodeError(
                    f"could not resolve host {parsed.host!r} (try again)"
                ) from None
            raise NodeError(f"could not resolve host {parsed.host!r}") from None
        except (OSError, UnicodeError):
            raise NodeError(f"could not resolve host {parsed.host!r}") from None
        if not resolved:
            raise NodeError(f"host {parsed.host!r} resolved to no address")
        addresses = []
        for text in resolved:
            try:
                addresses.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
            except ValueError:
                raise OutboundBlocked(parsed.host, "resolved to an invalid address") from None
    _vet_addresses(parsed.host, parsed.port, addresses, literal=parsed.literal is not None)
    return OutboundTarget(parsed.url, parsed.host, parsed.port, str(addresses[0]))


# --- requests ---------------------------------------------------------------------------


def check_header(name: Any, value: Any, *, secret: bool = False) -> tuple[str, str]:
    """Validate one request header; messages never show the value when ``secret``."""
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        shown = "(credential header)" if secret else repr(name)[:80]
        raise NodeError(f"invalid header name {shown}")
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise NodeError(f"header {name!r} must be a string")
    if any(ch in value for ch in "\r\n\0"):
        raise NodeError(f"header {name!r} contains a line break or NUL")
    return name, value


@dataclass(frozen=True, slots=True)
class OutboundResponse:
    status: int
    headers: dict[str, str]
    content: bytes
    url: str  # the final URL, after redirects
    charset: str | None = None
    redirects: list[str] = field(default_factory=list)

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def is_json(self) -> bool:
        media = self.media_type
        return media == "application/json" or media.endswith("+json")

    def text(self) -> str:
        try:
            return self.content.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")


# --- whole-request deadline -------------------------------------------------------------
# httpx timeouts are per operation: a server that sends one header line (or one body byte)
# every second never trips a 2 s read timeout. Every socket operation below gets at most
# the time left until the request's deadline instead, so the whole request (connect, TLS,
# sending, headers, body, redirects) ends by the deadline, wall clock. DNS runs in a
# helper thread that the caller stops waiting for at the deadline.


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("request deadline reached")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # CPython's TLS handshake applies its timeout to the whole handshake.
        left = self._left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: float) -> None:
        self._backend = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("request deadline reached")
        left = left if timeout is None else min(timeout, left)
        stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:  # pragma: no cover - nodes never use unix sockets
        raise httpcore.ConnectError("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(min(seconds, max(0.0, self._deadline - time.monotonic())))


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (no proxies from the environment), on the deadline backend."""

    def __init__(self, deadline: float) -> None:
        # HTTPTransport.__init__ is not called: it would build a second pool and TLS
        # context. Its methods only use ``_pool``.
        ssl_context = httpx.create_ssl_context(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, network_backend=_DeadlineBackend(deadline)
        )


# A few threads for getaddrinfo, which has no timeout of its own. A lookup that outlives
# its request's deadline is abandoned (the resolver's own timeouts end it later).
_dns_pool = ThreadPool(max_workers=8, thread_name_prefix="dns")


def _resolve_before(host: str, port: int, deadline: float) -> list[str]:
    future = _dns_pool.submit(lambda: resolve_host(host, port))
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise NodeTimeout(f"resolving host {host!r} timed out") from None


# --- decoding -----------------------------------------------------------------------------
# httpx decodes each network chunk through every Content-Encoding layer at once, so a
# few KB of "gzip, gzip" can expand to a gigabyte in one step before any size check.
# Here each layer hands on at most _DECODE_CHUNK bytes at a time and the cap is checked
# on every piece, so memory stays within a few chunks per layer, whatever the stack.

_DECODE_CHUNK = 64 * 1024
_MAX_ENCODING_LAYERS = 4
_ZLIB_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})
# Only what can be decoded incrementally here is offered to servers.
ACCEPT_ENCODING = "gzip, deflate"


class _RawBody:
    def __init__(self, chunks: Iterator[bytes], host: str, max_bytes: int) -> None:
        self._chunks = chunks
        self._host = host
        self._max_bytes = max_bytes
        self.size = 0

    def read(self) -> bytes:
        for chunk in self._chunks:
            if chunk:
                self.size += len(chunk)
                if self.size > self._max_bytes:
                    # Compressed bytes count too: a body that decodes to nothing must
                    # not stream forever either.
                    raise ResponseTooLarge(
                        f"response from {self._host!r} exceeded the limit of "
                        f"{self._max_bytes} bytes; download stopped"
                    )
                return chunk
        return b""


class _ZlibLayer:
    """One gzip or deflate layer, decoding at most _DECODE_CHUNK bytes per read."""

    def __init__(self, source: _RawBody | _ZlibLayer, encoding: str, host: str) -> None:
        self._source = source
        self._host = host
        self._gzip = encoding != "deflate"
        self._raw_deflate = False
        self._decoder = self._new_decoder()
        self._pending = b""
        self._produced = False
        self._drain = False  # the last call filled its output: more may be buffered

    def _new_decoder(self) -> Any:
        if self._gzip:
            return zlib.decompressobj(zlib.MAX_WBITS | 16)
        return zlib.decompressobj(-zlib.MAX_WBITS if self._raw_deflate else zlib.MAX_WBITS)

    def _decompress(self, data: bytes) -> bytes:
        try:
            return self._decoder.decompress(data, _DECODE_CHUNK)
        except zlib.error:
            if self._gzip or self._raw_deflate or self._produced:
                raise NodeError(f"response from {self._host!r} could not be decoded") from None
        # "deflate" without the zlib header (as some servers send it), like httpx does.
        self._raw_deflate = True
        self._decoder = self._new_decoder()
        return self._decompress(data)

    def read(self) -> bytes:
        while not self._decoder.eof:
            data = self._pending
            if not data and not self._drain:
                data = self._source.read()
                if not data:
                    try:
                        return self._decoder.flush(_DECODE_CHUNK)
                    except zlib.error:
                        raise NodeError(
                            f"response from {self._host!r} could not be decoded"
                        ) from None
                    finally:
                        self._pending = b""
                        self._drain = False
                        self._decoder = _Finished()
            out = self._decompress(data)
            self._pending = self._decoder.unconsumed_tail
            self._drain = len(out) >= _DECODE_CHUNK
            if out:
                self._produced = True
                return out
        return b""  # anything after the end of the stream is ignored, as httpx does


class _Finished:
    eof = True


def _read_capped(response: httpx.Response, host: str, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(
            f"response from {host!r} is {int(declared)} bytes, more than the limit of {max_bytes}"
        )
    encodings = [
        value.strip().lower()
        for value in response.headers.get_list("content-encoding", split_commas=True)
        if value.strip() and value.strip().lower() != "identity"
    ]
    if len(encodings) > _MAX_ENCODING_LAYERS:
        raise NodeError(
            f"response from {host!r} has {len(encodings)} content encodings "
            f"(at most {_MAX_ENCODING_LAYERS})"
        )
    for encoding in encodings:
        if encoding not in _ZLIB_ENCODINGS:
            raise NodeError(f"response from {host!r} has unsupported content encoding")
    source: _RawBody | _ZlibLayer = _RawBody(response.iter_raw(), host, max_bytes)
    for encoding in reversed(encodings):  # the last one applied is decoded first
        source = _ZlibLayer(source, encoding, host)
    chunks: list[bytes] = []
    size = 0
    while chunk := source.read():
        size += len(chunk)
        if size > max_bytes:
            raise ResponseTooLarge(
                f"response from {host!r} exceeded the limit of {max_bytes} bytes; download stopped"
            )
        if time.monotonic() > deadline:
            raise NodeTimeout(f"request to {host!r} timed out while reading the response")
        chunks.append(chunk)
    return b"".join(chunks)


def _transport_error(exc: httpx.HTTPError, host: str, seconds: float) -> NodeError:
    """Map an httpx error to a node error whose message cannot contain a header value."""
    if isinstance(exc, httpx.TimeoutException):
        return NodeTimeout(f"request to {host!r} timed out after {seconds:.1f}s")
    if isinstance(exc, httpx.ConnectError):
        return TransientNodeError(f"could not connect to {host!r}: {exc}")
    if isinstance(exc, httpx.LocalProtocolError):
        return NodeError(f"request to {host!r} could not be sent (invalid request)")
    if isinstance(exc, httpx.TransportError):
        return TransientNodeError(f"request to {host!r} failed: {type(exc).__name__}")
    if isinstance(exc, httpx.DecodingError):
        return NodeError(f"response from {host!r} could not be decoded")
    return NodeError(f"request to {host!r} failed: {type(exc).__name__}")


class OutboundContext(Protocol):
    """What a request needs from its caller (a node's NodeContext fits)."""

    node_id: str

    def remaining(self) -> float: ...

    def check(self) -> None: ...


def outbound_request(
    method: str,
    url: str,
    *,
    ctx: OutboundContext,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    sensitive_headers: Iterable[str] = (),
) -> OutboundResponse:
    """Make one HTTP request (following redirects) under the SSRF rules above.

    ``headers`` must already be checked with :func:`check_header`. Headers named in
    ``sensitive_headers`` (a credential) are dropped, like Authorization and Cookie,
    when a redirect leaves the original scheme/host/port.

    The whole request, redirects included, ends within ``min(HTTP_TIMEOUT_SECONDS,
    ctx.remaining())`` seconds, wall clock (NodeTimeout).
    """
    settings = get_settings()
    max_bytes = settings.HTTP_MAX_RESPONSE_BYTES
    budget = min(settings.HTTP_TIMEOUT_SECONDS, ctx.remaining())
    if budget <= 0:
        raise NodeTimeout("no time left for the outbound request")
    deadline = time.monotonic() + budget
    method = method.upper()
    request_headers = httpx.Headers(
        {k: v for k, v in (headers or {}).items() if k.lower() not in _MANAGED_HEADERS}
    )
    drop_on_leave = _ORIGIN_BOUND_HEADERS | {h.lower() for h in sensitive_headers}
    redirects: list[str] = []
    first_origin: tuple[str, str, int] | None = None
    current = url

    request_headers["Accept-Encoding"] = request_headers.get("accept-encoding", ACCEPT_ENCODING)
    client = httpx.Client(
        transport=_DeadlineTransport(deadline),
        trust_env=False,
        follow_redirects=False,
        timeout=budget,
    )
    with client:
        for hop in range(settings.HTTP_MAX_REDIRECTS + 1):
            ctx.check()
            target = vet_url(current, deadline=deadline)
            if first_origin is None:
                first_origin = target.origin
            elif target.origin != first_origin:
                for name in list(request_headers):
                    if name.lower() in drop_on_leave:
                        del request_headers[name]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeTimeout(f"request to {target.host!r} timed out after {budget:.1f}s")
            hop_headers = request_headers.copy()
            hop_headers["Host"] = target.host_header
            extensions: dict[str, Any] = {}
            if target.url.scheme == "https":
                extensions["sni_hostname"] = target.url.raw_host.decode("ascii")
            started = time.monotonic()
            try:
                request = client.build_request(
                    method,
                    target.connect_url,
                    headers=hop_headers,
                    content=content,
                    timeout=httpx.Timeout(remaining),
                    extensions=extensions,
                )
                response = client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, target.host, budget) from None
            client.cookies.clear()  # never carry cookies from one host to the next
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECT_CODES and location:
                    if hop >= settings.HTTP_MAX_REDIRECTS:
                        raise NodeError(
                            f"too many redirects (more than {settings.HTTP_MAX_REDIRECTS})"
                        )
                    try:
                        next_url = target.url.join(location)
                    except (httpx.InvalidURL, ValueError):
                        raise NodeError(f"invalid redirect from {target.host!r}") from None
                    status = response.status_code
                    if (status == 303 and method != "HEAD") or (
                        status in (301, 302) and method == "POST"
                    ):
                        method, content = "GET", None
                        for name in ("content-type", "content-encoding"):
                            request_headers.pop(name, None)
                    redirects.append(str(next_url))
                    logger.info(
                        "outbound_redirect",
                        host=target.host,
                        status=status,
                        to_host=next_url.host,
                        node_id=ctx.node_id,
                    )
                    current = str(next_url)
                    continue
                try:
                    body = (
                        b""
                        if method == "HEAD"
                        else _read_capped(response, target.host, max_bytes, deadline)
                    )
                except httpx.HTTPError as exc:
                    raise _transport_error(exc, target.host, budget) from None
                logger.info(
                    "outbound_request",
                    method=method,
                    host=target.host,
                    status=response.status_code,
                    bytes=len(body),
                    seconds=round(time.monotonic() - started, 3),
                    node_id=ctx.node_id,
                )
                return OutboundResponse(
                    status=response.status_code,
                    headers=dict(response.headers),
                    content=body,
                    url=str(target.url),
                    charset=response.charset_encoding,
                    redirects=redirects,
                )
            finally:
                response.close()
    raise NodeError("too many redirects")  # unreachable: the loop returns or raises
