"""Small servers that speak the start of the PostgreSQL protocol and then play an attacker.

Each listens on a free port on 127.0.0.1, runs its behaviour for every connection in a thread,
and records what the client sent after the point where a safe client must stop, so a test can
assert that no query (not even a startup packet) ever reached it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from safepg.testing import IssuedCertificate

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class Adversary:
    """A listening socket and a behaviour; ``received`` collects what leaked past the attack."""

    def __init__(self, behaviour: Callable[[socket.socket, Adversary], None]) -> None:
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self.connections = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stopped = threading.Event()
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        with contextlib.suppress(OSError, ssl.SSLError), conn:
            self.behaviour(conn, self)

    def settle(self) -> None:
        """Wait for the connections handled so far to end, then forget what they received."""
        for thread in list(self._threads):
            thread.join(timeout=10)
        self.received.clear()

    def leak(self, data: bytes) -> None:
        if data:
            self.received.append(data)

    def close(self) -> None:
        """Stop listening, hang up on every client, and wait for the handlers to finish."""
        self._stopped.set()
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)


@contextlib.contextmanager
def running(behaviour: Callable[[socket.socket, Adversary], None]) -> Iterator[Adversary]:
    adversary = Adversary(behaviour)
    try:
        yield adversary
    finally:
        adversary.close()


def read_ssl_request(conn: socket.socket) -> bool:
    data = b""
    while len(data) < 8:
        chunk = conn.recv(8 - len(data))
        if not chunk:
            return False
        data += chunk
    return data == SSL_REQUEST


def read_rest(conn: socket.socket, adversary: Adversary) -> None:
    """Collect anything the client sends from here on, until it hangs up."""
    with contextlib.suppress(OSError, ssl.SSLError):
        while True:
            data = conn.recv(4096)
            if not data:
                return
            adversary.leak(data)


def drain(conn: socket.socket) -> None:
    """Read and drop whatever the client sends, until it hangs up."""
    with contextlib.suppress(OSError, ssl.SSLError):
        while conn.recv(4096):
            pass


def server_context(cert: IssuedCertificate, directory: Path) -> ssl.SSLContext:
    cert_path, key_path = directory / "adversary.crt", directory / "adversary.key"
    cert.write(cert_path, key_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _wrap(ctx: ssl.SSLContext, conn: socket.socket) -> ssl.SSLSocket | None:
    """*conn* wrapped for a server-side handshake; None if the client has reset it already.

    CPython's wrap_socket leaves the SSLSocket it made unclosed when the peer reset the
    connection (getpeername or its pre-handshake recv fails): it is dropped here, unwarned.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            return None


# -- behaviours --------------------------------------------------------------------------------


def answer_n(conn: socket.socket, adversary: Adversary) -> None:
    """A downgrade: "no TLS here", hoping the client goes on in clear text."""
    if read_ssl_request(conn):
        conn.sendall(b"N")
        read_rest(conn, adversary)  # a startup packet here would be a leak


def inject_after_s(ctx: ssl.SSLContext) -> Callable[[socket.socket, Adversary], None]:
    """'S', then plaintext bytes (AuthenticationOk + ReadyForQuery), then a real TLS handshake."""

    def behaviour(conn: socket.socket, adversary: Adversary) -> None:
        if not read_ssl_request(conn):
            return
        fake = b"R" + struct.pack("!ii", 8, 0) + b"Z" + struct.pack("!i", 5) + b"I"
        conn.sendall(b"S" + fake)
        tls = _wrap(ctx, conn)
        if tls is None:
            return
        with tls:
            tls.do_handshake()
            read_rest(tls, adversary)

    return behaviour


def present(ctx: ssl.SSLContext) -> Callable[[socket.socket, Adversary], None]:
    """Agree to TLS and present the context's certificate; record any application data."""

    def behaviour(conn: socket.socket, adversary: Adversary) -> None:
        if not read_ssl_request(conn):
            return
        conn.sendall(b"S")
        with ctx.wrap_socket(conn, server_side=True) as tls:
            read_rest(tls, adversary)

    return behaviour


def just_in_time(ctx: ssl.SSLContext, hold: float) -> Callable[[socket.socket, Adversary], None]:
    """Hold each step just under the client's timeout: the 'S', then the handshake, then
    present the context's certificate. A client that times each step on its own waits for
    every one of them, on every connection it makes."""

    def behaviour(conn: socket.socket, adversary: Adversary) -> None:
        if not read_ssl_request(conn):
            return
        time.sleep(hold)
        conn.sendall(b"S")
        time.sleep(hold)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            read_rest(tls, adversary)

    return behaviour


def reset_mid_handshake(conn: socket.socket, adversary: Adversary) -> None:
    """Agree to TLS, read part of the ClientHello, then reset the connection."""
    if read_ssl_request(conn):
        conn.sendall(b"S")
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def stall(conn: socket.socket, adversary: Adversary) -> None:
    """Accept, read the SSLRequest, and never answer."""
    if read_ssl_request(conn):
        read_rest(conn, adversary)  # after an unanswered SSLRequest, anything sent is a leak
    else:
        drain(conn)  # a direct-TLS ClientHello (the fast path's probe): encrypted, not a leak


PHISHING = "please log in again at http://evil.example/login"


def error_before_tls(conn: socket.socket, adversary: Adversary) -> None:
    """Answer the SSLRequest with an ErrorResponse whose text nobody authenticated."""
    if read_ssl_request(conn):
        fields = b"SFATAL\0C28000\0M" + PHISHING.encode() + b"\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
        read_rest(conn, adversary)


def tls_proxy(
    ctx: ssl.SSLContext, upstream_port: int, upstream_ca: Path
) -> Callable[[socket.socket, Adversary], None]:
    """A TLS-terminating middlebox: its own certificate to the client, real TLS upstream."""

    def behaviour(conn: socket.socket, adversary: Adversary) -> None:
        if not read_ssl_request(conn):
            return
        conn.sendall(b"S")
        with (
            ctx.wrap_socket(conn, server_side=True) as client,
            socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as raw,
        ):
            raw.sendall(SSL_REQUEST)
            if raw.recv(1) != b"S":
                return
            up_ctx = ssl.create_default_context(cafile=str(upstream_ca))
            up_ctx.check_hostname = False
            with up_ctx.wrap_socket(raw, server_hostname="localhost") as upstream:
                _relay(client, upstream, adversary)

    return behaviour


def _relay(a: ssl.SSLSocket, b: ssl.SSLSocket, adversary: Adversary) -> None:
    def pump(src: ssl.SSLSocket, dst: ssl.SSLSocket, record: bool) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    adversary.leak(data)  # what the client sent: readable by the middlebox
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=pump, args=(b, a, False), daemon=True)
    back.start()
    pump(a, b, True)
    back.join(timeout=10)


def http_server(conn: socket.socket, adversary: Adversary) -> None:
    """Not PostgreSQL at all: a web server, answering the SSLRequest's bytes as bad HTTP."""
    read_ssl_request(conn)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def hang_up(conn: socket.socket, adversary: Adversary) -> None:
    """Accept, read the SSLRequest, and close the connection without a word."""
    read_ssl_request(conn)
