"""Count SQL round trips as the PostgreSQL server sees them.

:class:`RoundTripProxy` is a small TCP proxy in front of the server. It reads the
frontend (client -> server) side of the wire protocol and counts the messages that make
the server answer (every message kind is counted in :attr:`counts`, the round trips are
these two): a simple ``Query`` ('Q', which is how psycopg sends ``BEGIN``,
``COMMIT`` and ``ROLLBACK``) and a ``Sync`` ('S', the end of every extended-protocol
statement: a pool pre-ping, a SELECT, an INSERT). A round trip is a flight: what the
client sends, containing at least one of these, between two answers of the server. A
client that waits for each statement makes one flight per Query or Sync; one that sends
a batch without waiting (psycopg's pipeline mode) makes one flight for the batch,
whatever the number of Syncs in it. Nothing the server had to answer is missed,
whichever library (SQLAlchemy, raw psycopg) or process (a prefork worker child) sent it.

Use it by pointing DATABASE_URL at :meth:`RoundTripProxy.url_for`. Counts are totals
over all connections; :meth:`snapshot` and differences of snapshots give the count for
one piece of work. psycopg prepares a statement server-side on its 5th execution on a
connection, which costs a round trip of its own: count a steady state (after a few runs
of the same work), not the first runs.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
from typing import Any

import sqlalchemy as sa

# Untyped first messages (length, code): SSLRequest, GSSENCRequest, CancelRequest.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


class RoundTripProxy:
    """A counting TCP proxy for PostgreSQL on 127.0.0.1 (a free port)."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="pg-proxy", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------

    def url_for(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        url = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    @property
    def round_trips(self) -> int:
        with self._lock:
            return self.counts["flights"]

    def snapshot(self) -> dict[str, int]:
        """Round trips so far: ``total`` (flights), ``queries`` ('Q': BEGIN/COMMIT...),
        ``syncs`` ('S': extended-protocol statements) and ``connections``."""
        with self._lock:
            return {
                "total": self.counts["flights"],
                "queries": self.counts["Q"],
                "syncs": self.counts["S"],
                "connections": self.counts["connections"],
            }

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> RoundTripProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.counts["connections"] += 1
                self._sockets += [client, server]
            answered = threading.Event()  # the server spoke since the client's last flight
            answered.set()
            threading.Thread(
                target=self._frontend,
                args=(client, server, answered),
                daemon=True,
                name="pg-proxy-fe",
            ).start()
            threading.Thread(
                target=self._pipe, args=(server, client, answered), daemon=True, name="pg-proxy-be"
            ).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, answered: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                answered.set()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _frontend(
        self, client: socket.socket, server: socket.socket, answered: threading.Event
    ) -> None:
        """Forward client bytes unchanged while parsing them into protocol messages."""
        buffer = bytearray()
        started = False  # past the untyped startup message(s)
        try:
            while data := client.recv(65536):
                # Counted before forwarding: the client waits for the server's answer, so
                # whoever reads the count after the call returns sees the message counted.
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!II", buffer[:8])
                        if len(buffer) < length:
                            break
                        del buffer[:length]
                        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                            # The server answers 'N' (this proxy does not do TLS); the
                            # client then sends its real startup message.
                            continue
                        started = True
                        continue
                    if len(buffer) < 5:
                        break
                    kind = chr(buffer[0])
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    del buffer[: 1 + length]
                    with self._lock:
                        self.counts[kind] += 1
                        if kind in "QS" and answered.is_set():
                            # The first message the server must answer since its last
                            # answer: the client will wait for this one, a new flight.
                            answered.clear()
                            self.counts["flights"] += 1
                server.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def count_round_trips(proxy: RoundTripProxy, fn: Any) -> tuple[Any, int]:
    """``(fn(), round trips it made)`` (nothing else may use the proxy meanwhile)."""
    before = proxy.round_trips
    result = fn()
    return result, proxy.round_trips - before
