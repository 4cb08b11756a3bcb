"""Outbound calls stay within their caps against hostile servers: a wall-clock deadline
for the whole request (trickled headers or body, slow DNS), and decoded-size and memory
caps for any stack of content encodings (decompression bombs)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowbuilder.platform import ssrf
from flowbuilder.platform.nodes import NodeContext, NodeError, NodeTimeout
from flowbuilder.platform.settings import override_settings
from flowbuilder.platform.ssrf import ResponseTooLarge, outbound_request

try:
    from tests.platform._http_server import LocalServer, local_server
except ImportError:  # pragma: no cover - rootdir-relative import mode
    from _http_server import LocalServer, local_server  # type: ignore[no-redef]

LOCAL = ["127.0.0.1"]


def make_ctx(seconds: float = 60.0) -> NodeContext:
    return NodeContext("exec-1", "user-1", "fetch", deadline=time.monotonic() + seconds)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as srv:
        yield srv


class TrickleServer:
    """Answers every connection by sending ``parts`` one at a time, ``interval`` apart."""

    def __init__(self, parts: list[bytes], interval: float) -> None:
        self.parts = parts
        self.interval = interval
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for part in self.parts:
                if self.stopped.wait(self.interval):
                    return
                try:
                    conn.sendall(part)
                except OSError:
                    return  # the client gave up: expected

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


# --- item 11: one deadline for the whole request -------------------------------------------

TRICKLED_HEADERS = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Slow: 1\r\n"] * 60 + [b"\r\n"]
TRICKLED_BODY = [b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n"] + [b"x"] * 60


@pytest.mark.parametrize("parts", [TRICKLED_HEADERS, TRICKLED_BODY], ids=["headers", "body"])
def test_trickling_server_is_cut_at_the_deadline(parts: list[bytes]) -> None:
    """Each line arrives well within the per-read timeout; the whole would take 30 s."""
    trickle = TrickleServer(parts, interval=0.5)
    try:
        start = time.monotonic()
        settings = override_settings(HTTP_TIMEOUT_SECONDS=2, OUTBOUND_ALLOWLIST=LOCAL)
        with settings, pytest.raises(NodeTimeout, match="timed out"):
            outbound_request("GET", f"http://127.0.0.1:{trickle.port}/", ctx=make_ctx())
        # Bounded (it was 12-20 s before); generous against a loaded machine.
        assert time.monotonic() - start < 6
    finally:
        trickle.close()


def test_node_deadline_bounds_a_trickle_too() -> None:
    trickle = TrickleServer(TRICKLED_HEADERS, interval=0.5)
    try:
        start = time.monotonic()
        settings = override_settings(HTTP_TIMEOUT_SECONDS=60, OUTBOUND_ALLOWLIST=LOCAL)
        with settings, pytest.raises(NodeTimeout):
            outbound_request("GET", f"http://127.0.0.1:{trickle.port}/", ctx=make_ctx(1.5))
        assert time.monotonic() - start < 6
    finally:
        trickle.close()


def test_slow_dns_is_under_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hanging_resolver(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["93.184.216.34"]

    monkeypatch.setattr(ssrf, "resolve_host", hanging_resolver)
    start = time.monotonic()
    try:
        with override_settings(HTTP_TIMEOUT_SECONDS=1), pytest.raises(NodeTimeout, match="resolv"):
            outbound_request("GET", "http://slow-dns.example/", ctx=make_ctx())
        assert time.monotonic() - start < 5
    finally:
        release.set()


def test_a_normal_request_still_works_with_the_deadline(server: LocalServer) -> None:
    server.route("/", body=b"hello")
    with override_settings(HTTP_TIMEOUT_SECONDS=2, OUTBOUND_ALLOWLIST=LOCAL):
        response = outbound_request("GET", server.url("/"), ctx=make_ctx())
    assert response.content == b"hello"
    assert server.requests[0].headers["accept-encoding"] == "gzip, deflate"


# --- item 10: content encodings, decoded incrementally under the cap ----------------------


def _deflate(data: bytes, raw: bool = False) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", _deflate),
        ("deflate", lambda d: _deflate(d, raw=True)),  # deflate without the zlib header
        ("gzip, deflate", lambda d: _deflate(gzip.compress(d))),
        ("deflate, gzip, gzip", lambda d: gzip.compress(gzip.compress(_deflate(d)))),
        ("identity", lambda d: d),
    ],
)
def test_encoding_stacks_decode(server: LocalServer, encoding: str, encode: object) -> None:
    payload = json.dumps({"rows": list(range(50_000))}).encode()  # > several decode chunks
    server.route("/", body=encode(payload), headers={"Content-Encoding": encoding})  # type: ignore[operator]
    with override_settings(OUTBOUND_ALLOWLIST=LOCAL):
        response = outbound_request("GET", server.url("/"), ctx=make_ctx())
    assert response.content == payload


def test_decoded_size_is_capped_for_stacked_gzip(server: LocalServer) -> None:
    payload = b"a" * 3_000_000
    server.route(
        "/", body=gzip.compress(gzip.compress(payload)), headers={"Content-Encoding": "gzip, gzip"}
    )
    settings = override_settings(OUTBOUND_ALLOWLIST=LOCAL, HTTP_MAX_RESPONSE_BYTES=1_000_000)
    with settings, pytest.raises(ResponseTooLarge, match="1000000"):
        outbound_request("GET", server.url("/"), ctx=make_ctx())


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        ("br", b"\x00", "unsupported content encoding"),
        ("gzip, gzip, gzip, gzip, gzip", b"", "content encodings"),
        ("gzip", b"this is not gzip at all", "could not be decoded"),
    ],
)
def test_undecodable_or_unsupported_encodings_are_refused(
    server: LocalServer, encoding: str, body: bytes, message: str
) -> None:
    server.route("/", body=body, headers={"Content-Encoding": encoding})
    with override_settings(OUTBOUND_ALLOWLIST=LOCAL), pytest.raises(NodeError, match=message):
        outbound_request("GET", server.url("/"), ctx=make_ctx())


def _gzip_bomb(decoded_bytes: int) -> bytes:
    """gzip(gzip(zeros)): the inner layer is ~1/1000 of the decoded size, the outer tiny."""
    inner = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    parts = [inner.compress(block) for _ in range(decoded_bytes >> 20)]
    parts.append(inner.flush())
    return gzip.compress(b"".join(parts), 9)


_BOMB_CLIENT = r"""
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from flowbuilder.platform.nodes import NodeContext
from flowbuilder.platform.settings import override_settings
from flowbuilder.platform.ssrf import ResponseTooLarge, outbound_request
from tests.platform._http_server import local_server

bomb = Path({bomb!r}).read_bytes()
with local_server() as server:
    server.route("/", body=bomb, headers={{"Content-Encoding": "gzip, gzip"}})
    ctx = NodeContext("e", "u", "n", deadline=time.monotonic() + 60)
    with override_settings(OUTBOUND_ALLOWLIST=["127.0.0.1"]):
        outbound_request("GET", server.url("/small"), ctx=ctx)  # warm up imports and pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            outbound_request("GET", server.url("/"), ctx=ctx)
            outcome = "returned"
        except ResponseTooLarge:
            outcome = "ResponseTooLarge"
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(outcome, (after - before) * 1024)
"""


def test_gzip_bomb_peak_memory_stays_near_the_cap(tmp_path: Path) -> None:
    """A 2-layer gzip response of ~1 GiB decoded (about 1 MiB inner, a few KB on the
    wire): ResponseTooLarge, and the process's peak memory grows by less than 4x the cap
    (it grew by ~2 GB when httpx decoded each layer in one go)."""
    cap = 5 * 1024 * 1024
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(_gzip_bomb(1 << 30))
    assert bomb.stat().st_size < 200_000
    root = str(Path(__file__).resolve().parents[2])
    script = _BOMB_CLIENT.format(root=root, bomb=str(bomb))
    env = dict(os.environ, HTTP_MAX_RESPONSE_BYTES=str(cap), LOG_LEVEL="WARNING")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    outcome, growth = done.stdout.split()[-2:]
    assert outcome == "ResponseTooLarge"
    assert int(growth) < 4 * cap, f"peak memory grew by {int(growth) / 2**20:.1f} MiB"
