"""A TLS probe that speaks PostgreSQL's SSLRequest preamble and reads the server's chain.

Two uses, neither of which decides whether a connection is allowed (libpq does, with
``sslmode=verify-full``):

- `probe`: after libpq has refused a server, explain why: which certificate the server presents,
  who issued it, when it expires, what names it holds. All of it is unauthenticated.
- `presented_chain`: before a first connect, read which certificates a server sends, so that the
  fast path can hand libpq only the anchors that can verify them (see ``_fastpath``).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal

from ._stdssl import client_context
from ._text import shown

# SSLRequest: length 8, then the magic code 1234.5679.
_SSLREQUEST = struct.pack("!ii", 8, 80877103)


@dataclass(frozen=True)
class CertificateInfo:
    """What a certificate says about itself (as presented; not a proof of anything)."""

    subject: str
    issuer: str
    names: tuple[str, ...]  # every subjectAltName value, DNS names and IP addresses alike
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    common_name: str | None = None

    def describe(self) -> str:
        """One line for messages, every name escaped (`_text.shown`): the server wrote them."""
        names = ", ".join(map(shown, self.names)) if self.names else "no subjectAltName"
        until = f", valid until {self.not_after:%Y-%m-%d}" if self.not_after else ""
        subject = shown(self.subject) or "(empty)"
        return f"subject {subject}, issued by {shown(self.issuer)}{until}; names: {names}"


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe.

    Attributes:
        tls: the server accepted the SSLRequest.
        verify_code: OpenSSL's X509_V_ERR code when the chain did not verify, else None.
        verify_message: OpenSSL's text for *verify_code*.
        chain: the certificates the server sent, leaf first.
    """

    tls: bool
    verify_code: int | None = None
    verify_message: str | None = None
    chain: tuple[CertificateInfo, ...] = ()
    # Without TLS: the byte that answered the SSLRequest ('N': a PostgreSQL server without TLS;
    # b"": the connection was closed; anything else: not PostgreSQL's answer).
    answer: bytes = b""


# Why a probe got no answer to judge: the name does not resolve; the connection is refused;
# the TCP connection is not answered in time; it is accepted, then nothing answers the
# SSLRequest in time ("silent"); the TLS handshake fails; another network error.
UnreachedReason = Literal["unresolved", "refused", "timeout", "silent", "handshake", "error"]


@dataclass(frozen=True)
class Unreached:
    """Why a probe read no certificate: *reason*, and the system's words for it (*detail*)."""

    reason: UnreachedReason
    detail: str = ""


def ssl_answer(sock: socket.socket) -> bytes:
    """Send PostgreSQL's SSLRequest on *sock*; the one byte answered (b"" if it closed).

    Only the single answer byte is read: anything the server sends after it, before the
    handshake, is unauthenticated and must not be taken as a response (CVE-2021-23222).
    """
    sock.sendall(_SSLREQUEST)
    return sock.recv(1)


def request_tls(sock: socket.socket) -> bool:
    """Send PostgreSQL's SSLRequest on *sock*; True if the server answers 'S' (TLS follows)."""
    return ssl_answer(sock) == b"S"


def _left(end: float) -> float:
    """Seconds until *end*; TimeoutError once it has passed."""
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError("the probe's time is up")
    return left


def _connect(address: str, port: int, end: float) -> socket.socket:
    """A TCP connection to the first of *address*'s addresses that answers before *end*.

    Unlike socket.create_connection, every address shares one deadline rather than each
    getting the whole timeout.
    """
    last: OSError | None = None
    try:
        found = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # a name IDNA cannot encode: unreachable, as for any bad name
        raise OSError(f"cannot look up {address!r}") from None
    for family, kind, proto, _name, where in found:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(end))
            sock.connect(where)
        except OSError as ex:  # TimeoutError included
            sock.close()
            last = ex
            if isinstance(ex, TimeoutError):
                break
            continue
        return sock
    raise last or OSError(f"no address for {address}")


def _open(address: str, port: int, end: float, direct: bool) -> socket.socket:
    """A TCP connection on which TLS can start, opened before the monotonic time *end*.

    With *direct*, TLS starts at once (PostgreSQL 17+, ALPN ``postgresql``); otherwise after
    PostgreSQL's SSLRequest. The socket's timeout is left at the time remaining, so that the
    handshake that follows (whose timeout CPython applies to the whole handshake) ends by *end*
    too: a peer that answers each step just in time cannot stretch the probe.

    Raises:
        OSError: the server is unreachable (TimeoutError: not by *end*).
        _NoTLS: the server declined the SSLRequest.
    """
    sock = _connect(address, port, end)
    try:
        if not direct:
            sock.settimeout(_left(end))
            try:
                answer = ssl_answer(sock)
            except TimeoutError:
                raise _Silent from None
            if answer != b"S":
                sock.close()
                raise _NoTLS(answer)
        sock.settimeout(_left(end))
    except OSError:
        sock.close()
        raise
    return sock


class _NoTLS(Exception):
    def __init__(self, answer: bytes = b"N") -> None:
        super().__init__(answer)
        self.answer = answer


class _Silent(TimeoutError):
    """The TCP connection was accepted, then the SSLRequest got no answer in time."""


def _unreached(ex: OSError) -> Unreached:
    detail = (ex.strerror or str(ex)).lower()
    if isinstance(ex, _Silent):
        return Unreached("silent")
    if isinstance(ex, TimeoutError):
        return Unreached("timeout")
    if isinstance(ex, ConnectionRefusedError):
        return Unreached("refused", detail)
    if isinstance(ex, socket.gaierror) or str(ex).startswith("cannot look up"):
        return Unreached("unresolved", detail)
    return Unreached("error", detail)


def _sni(server_hostname: str | None) -> str | None:
    # libpq sends SNI for names, never for IP addresses (and not with sslsni=0).
    return server_hostname if server_hostname and not _is_ip(server_hostname) else None


_unverified: dict[bool, ssl.SSLContext] = {}


def _unverified_context(direct: bool) -> ssl.SSLContext:
    ctx = _unverified.get(direct)
    if ctx is None:
        ctx = client_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # only reads what is presented; libpq verifies
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if direct:
            ctx.set_alpn_protocols(["postgresql"])
        _unverified[direct] = ctx
    return ctx


@dataclass(frozen=True)
class Presented:
    """What a server sent, unverified: whether it offered TLS, and its chain as DER, leaf first."""

    tls: bool
    chain: tuple[bytes, ...] = ()
    timed_out: bool = False  # the server accepted the connection, then said nothing in time


def presented_chain(
    address: str, port: int, *, server_hostname: str | None, timeout: float, direct: bool = False
) -> Presented | None:
    """Read the certificates *address*:*port* presents, without verifying anything.

    *server_hostname* is sent as SNI (unless it is an IP address), as libpq does. *timeout*
    bounds the whole probe, not each step. Returns None when the server cannot be reached or
    the handshake fails.
    """
    try:
        sock = _open(address, port, time.monotonic() + timeout, direct)
    except _NoTLS:
        return Presented(tls=False)
    except TimeoutError:
        return Presented(tls=False, timed_out=True)
    except OSError:
        return None
    with sock:
        try:
            ctx = _unverified_context(direct)
            with ctx.wrap_socket(sock, server_hostname=_sni(server_hostname)) as tls:
                return Presented(True, _der_chain(tls))
        except TimeoutError:
            return Presented(tls=False, timed_out=True)
        except (OSError, ssl.SSLError, ValueError):
            return None


def _der_chain(tls: ssl.SSLSocket) -> tuple[bytes, ...]:
    public = getattr(tls, "get_unverified_chain", None)  # Python 3.13+: DER bytes
    if public is not None:
        return tuple(public() or ())
    certs = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # 3.10-3.12
    encoding = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return tuple(c.public_bytes(encoding) for c in certs or ())


def _name(rdns: Any) -> str:
    return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)


def _time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(value), dt.timezone.utc)


def _info(cert: Any) -> CertificateInfo:
    d = cert.get_info()
    san = d.get("subjectAltName", ())
    cns = [v for rdn in d.get("subject", ()) for k, v in rdn if k == "commonName"]
    return CertificateInfo(
        subject=_name(d.get("subject", ())),
        issuer=_name(d.get("issuer", ())),
        names=tuple(v for _k, v in san),
        not_before=_time(d.get("notBefore")),
        not_after=_time(d.get("notAfter")),
        dns_names=tuple(v for k, v in san if k == "DNS"),
        # OpenSSL writes IPv6 addresses in its own long form; normalise them for comparison.
        ip_addresses=tuple(_ip_text(v) for k, v in san if k == "IP Address"),
        common_name=cns[-1] if cns else None,
    )


def _ip_text(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _chain(tls: ssl.SSLSocket) -> tuple[CertificateInfo, ...]:
    # The SSL object's get_unverified_chain() (Python 3.10+) returns certificate objects with
    # get_info(); SSLSocket's public one (3.13+) returns only DER bytes, which the standard
    # library cannot decode.
    getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    try:
        certs = getter() if getter else None
        return tuple(_info(c) for c in certs or ())
    except (AttributeError, ValueError, ssl.SSLError):  # pragma: no cover - other interpreters
        return ()


def probe(
    address: str, port: int, cafile: str, *, server_hostname: str | None, timeout: float
) -> ProbeResult | None:
    """Connect to *address*:*port*, ask for TLS, and check the chain against *cafile*.

    The host name is not checked here: that is libpq's decision alone. *timeout* bounds the
    whole probe, not each step. Returns None when the server cannot be reached or the exchange
    fails before a certificate arrives.
    """
    result = probe_detailed(address, port, cafile, server_hostname=server_hostname, timeout=timeout)
    return None if isinstance(result, Unreached) else result


def probe_detailed(
    address: str, port: int, cafile: str, *, server_hostname: str | None, timeout: float
) -> ProbeResult | Unreached:
    """`probe`, saying why when it reads no certificate (for ``safepg inspect``)."""
    end = time.monotonic() + timeout
    ctx = client_context()
    ctx.check_hostname = False  # libpq judges host names; this only reads and checks the chain
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Verify as libpq does: Python 3.13 adds strict RFC 5280 checks and partial chains by
    # default, and a diagnosis must report the reason libpq failed for, not another one.
    ctx.verify_flags &= ~(ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN)
    ctx.load_verify_locations(cafile=cafile)
    try:
        sock = _open(address, port, end, direct=False)
    except _NoTLS as ex:
        return ProbeResult(tls=False, answer=ex.answer)
    except OSError as ex:
        return _unreached(ex)
    with sock:
        try:
            sni = _sni(server_hostname)
            tls = ctx.wrap_socket(sock, server_hostname=sni, do_handshake_on_connect=False)
            with tls:
                try:
                    tls.do_handshake()
                except ssl.SSLCertVerificationError as ex:
                    return ProbeResult(True, ex.verify_code, ex.verify_message, _chain(tls))
                return ProbeResult(True, None, None, _chain(tls))
        except (OSError, ssl.SSLError) as ex:
            return Unreached("handshake", str(getattr(ex, "reason", None) or ex))


def offers_tls(address: str, port: int, *, timeout: float) -> bool | None:
    """Whether the server at *address*:*port* answers PostgreSQL's SSLRequest with 'S'.

    Reads the single answer byte and nothing else; needs no trust anchors, so it serves a
    caller's own ``ssl.SSLContext`` too. None when the server cannot be reached in *timeout*.
    """
    try:
        sock = _open(address, port, time.monotonic() + timeout, direct=False)
    except _NoTLS:
        return False
    except OSError:
        return None
    sock.close()
    return True


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
