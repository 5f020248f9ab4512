"""safepg.ssl_context(): a verify-full ssl.SSLContext, used by a plain stdlib client."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

import safepg
from safepg import ConfigurationError, _sslcontext
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def handshake(server: PostgresServer, ctx: ssl.SSLContext, host: str) -> str:
    """PostgreSQL's SSLRequest over a raw socket, then a TLS handshake; the TLS version."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            return str(tls.version())


def subject(cert: Any) -> dict[str, str]:
    return dict(rdn[0] for rdn in cert["subject"])


def test_verify_full_settings(server: PostgresServer) -> None:
    ctx = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_verifies_the_real_server(server: PostgresServer) -> None:
    ctx = safepg.ssl_context("localhost", sslrootcert=str(server.ca_path))
    assert handshake(server, ctx, "localhost") in ("TLSv1.2", "TLSv1.3")


def test_refuses_a_rogue_ca(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    ctx = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(server, ctx, "localhost")


def test_refuses_another_name(server: PostgresServer) -> None:
    ctx = safepg.ssl_context("other.example", sslrootcert=server.ca_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server, ctx, "other.example")


def test_pgsslrootcert(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", str(server.ca_path))
    ctx = safepg.ssl_context("localhost")
    assert handshake(server, ctx, "localhost")


def test_libpq_default_root_crt(server: PostgresServer, clean_env: Path) -> None:
    (clean_env / ".postgresql").mkdir()
    (clean_env / ".postgresql" / "root.crt").write_bytes(server.ca_path.read_bytes())
    assert handshake(server, safepg.ssl_context("localhost"), "localhost")


def test_rds_host_gets_the_bundled_roots() -> None:
    ctx = safepg.ssl_context("mydb.abc123.eu-west-1.rds.amazonaws.com")
    orgs = {subject(c).get("organizationName") for c in ctx.get_ca_certs()}
    assert orgs == {"Amazon Web Services, Inc."}
    assert len(ctx.get_ca_certs()) > 50  # every region's roots


def test_rds_proxy_gets_public_roots_without_patching_certifi() -> None:
    """asyncpg #952: RDS Proxy's ACM certificates chain to Amazon's public roots."""
    source = _sslcontext.trust_for("app.proxy-abc123.us-east-1.rds.amazonaws.com", None)
    assert source.origin in ("os-store", "certifi")


def test_no_host_falls_back_to_the_os_store_or_certifi() -> None:
    source = _sslcontext.trust_for(None, None)
    assert source.origin in ("os-store", "certifi")
    assert safepg.ssl_context().get_ca_certs()


def test_system(server: PostgresServer) -> None:
    assert _sslcontext.trust_for("localhost", "system").origin == "os-store"


@pytest.mark.parametrize("host", ["/var/run/postgresql", "@abstract", "", "bad host", "a@b"])
def test_bad_hosts_are_refused(host: str) -> None:
    with pytest.raises(ConfigurationError, match="host"):
        safepg.ssl_context(host)


@pytest.mark.parametrize("content", [None, b"", b"not a certificate"])
def test_bad_ca_files_are_refused(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError, match="named by the sslrootcert argument"):
        safepg.ssl_context("localhost", sslrootcert=path)


def test_each_call_returns_a_context_of_its_own(server: PostgresServer) -> None:
    first = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    first.check_hostname = False
    first.verify_mode = ssl.CERT_NONE
    second = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    assert second.verify_mode == ssl.CERT_REQUIRED
    assert second.check_hostname


def test_connect_paths_share_a_sealed_context_callers_get_their_own(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    trust = _sslcontext.trust_for("localhost", server.ca_path)
    shared = _sslcontext.cached_context(trust)
    rogue = rogue_ca.write_cert(tmp_path / "rogue.pem")
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        shared.load_verify_locations(cafile=str(rogue))
    with pytest.raises(AttributeError, match=r"safepg\.ssl_context"):
        shared.check_hostname = False
    assert shared.check_hostname
    vars(shared).clear()  # the seal is not kept where the holder of the context can reach
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        shared.verify_mode = ssl.CERT_NONE
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        shared.load_verify_locations(cafile=str(rogue))
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        shared._set_alpn_protocols(bytearray(b"\x04evil"))  # type: ignore[attr-defined]
    assert shared.verify_mode == ssl.CERT_REQUIRED
    assert len(shared.get_ca_certs()) == 1
    mine = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    assert isinstance(mine, ssl.SSLContext)
    assert not isinstance(mine, _sslcontext.SealedContext)
    mine.load_verify_locations(cafile=str(rogue))  # the caller's own, to change at will
    assert len(_sslcontext.cached_context(trust).get_ca_certs()) == 1


def test_cached_context_follows_the_file(server: PostgresServer, tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(server.ca_path.read_bytes())
    trust = _sslcontext.trust_for("localhost", path)
    first = _sslcontext.cached_context(trust)
    assert _sslcontext.cached_context(trust) is first
    other = CertificateAuthority("another CA")
    other.write_cert(path)
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    changed = _sslcontext.cached_context(_sslcontext.trust_for("localhost", path))
    assert changed is not first
    subjects = [subject(c)["commonName"] for c in changed.get_ca_certs()]
    assert subjects == ["another CA"]


def test_client_certificate(server: PostgresServer, tmp_path: Path) -> None:
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    server.ca.issue("app").write(cert, key)
    ctx = safepg.ssl_context("localhost", sslrootcert=server.ca_path, sslcert=cert, sslkey=key)
    assert handshake(server, ctx, "localhost")
    with pytest.raises(ConfigurationError, match="without sslcert"):
        safepg.ssl_context("localhost", sslrootcert=server.ca_path, sslkey=key)
    with pytest.raises(ConfigurationError, match="client certificate"):
        safepg.ssl_context("localhost", sslrootcert=server.ca_path, sslcert=tmp_path / "nope")


# -- decisions the mutation stage showed untested (mutation/RESULTS.md) -----------------------


@pytest.mark.parametrize("host", ["/var/run/postgresql", "@abstract"])
def test_a_socket_host_is_refused_as_a_socket(host: str) -> None:
    # Said as what it is (a Unix-domain socket has no TLS), not as a malformed host name.
    with pytest.raises(ConfigurationError, match="a Unix-domain socket has no TLS"):
        safepg.ssl_context(host)


def test_pgsslrootcert_is_named_as_the_origin(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", str(server.ca_path))
    assert _sslcontext.trust_for("localhost", None).origin == "PGSSLROOTCERT"
    assert _sslcontext.trust_for("localhost", server.ca_path).origin == "sslrootcert"


def test_the_context_offers_the_postgresql_alpn(tmp_path: Path) -> None:
    """PostgreSQL 17+ takes a direct TLS connection only with ALPN "postgresql": a real
    handshake over a socket pair, with a server that selects it when the client offers it."""
    ca = CertificateAuthority("alpn CA")
    cert, key = ca.issue("localhost").write(tmp_path / "s.crt", tmp_path / "s.key")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.set_alpn_protocols(["postgresql"])
    client_ctx = safepg.ssl_context("localhost", sslrootcert=ca.write_cert(tmp_path / "ca.pem"))
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    with left, right:
        served: list[str | None] = []

        def serve() -> None:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                served.append(tls.selected_alpn_protocol())

        thread = threading.Thread(target=serve)
        thread.start()
        with client_ctx.wrap_socket(left, server_hostname="localhost") as tls:
            chosen = tls.selected_alpn_protocol()
        thread.join(10)
    assert chosen == "postgresql"
    assert served == ["postgresql"]


def test_a_trust_file_gone_before_loading_is_a_configuration_error(
    server: PostgresServer, tmp_path: Path
) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(server.ca_path.read_bytes())
    trust = _sslcontext.trust_for("localhost", path)
    path.unlink()  # between resolving the trust anchors and loading them
    with pytest.raises(ConfigurationError, match="OpenSSL could not load the trust anchors"):
        _sslcontext.new_context(trust)
    with pytest.raises(ConfigurationError, match="OpenSSL could not load the trust anchors"):
        _sslcontext.cached_context(trust)


def test_client_certificate_errors_say_why(server: PostgresServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigurationError) as info:
        safepg.ssl_context("localhost", sslrootcert=server.ca_path, sslcert=missing)
    # The operating system's reason, as a sentence (not "[Errno 2] ...").
    assert f"{str(missing)!r}: No such file or directory. Check the paths" in str(info.value)
    not_pem = tmp_path / "not.crt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"\[SSL\] PEM lib"):
        safepg.ssl_context("localhost", sslrootcert=server.ca_path, sslcert=not_pem)


def test_debug_log_names_the_host(server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="safepg"):
        safepg.ssl_context("localhost", sslrootcert=server.ca_path)
        safepg.ssl_context(sslrootcert=server.ca_path)
    lines = [r.getMessage() for r in caplog.records if "ssl_context for" in r.getMessage()]
    assert lines[0].startswith("safepg: ssl_context for localhost trusts ")
    assert lines[1].startswith("safepg: ssl_context for any host trusts ")


def test_a_context_made_without_the_cache_is_sealed_too(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file's version cannot be read (it is being replaced: os.stat fails, then the file is
    # back when OpenSSL opens it). The context made outside the cache goes to a connection
    # all the same: sealed as the shared ones.
    path = tmp_path / "ca.pem"
    path.write_bytes(server.ca_path.read_bytes())
    trust = _sslcontext.trust_for("localhost", path)
    real_stat = os.stat

    def stat(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(name) == str(path):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(name, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "stat", stat)
        ctx = _sslcontext.cached_context(trust)
    assert isinstance(ctx, _sslcontext.SealedContext)
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        ctx.check_hostname = False
