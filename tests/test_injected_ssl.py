"""Contexts nobody else can widen: after ``truststore.inject_into_ssl()``, safepg's contexts
still trust exactly the anchors they name.

truststore replaces ``ssl.SSLContext`` with a class that trusts the OS store on top of what is
loaded into it. The OS store is made here to hold a "public" CA (``SSL_CERT_FILE``: truststore
on Linux reads OpenSSL's default paths); the real server presents a certificate from that CA;
every entry point that builds a context, pinned to the server's own CA, must refuse it. Each
case runs in a subprocess, so that the injection does not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

pytest.importorskip("truststore")
pytest.importorskip("asyncpg")

# Runs in the child: argv[1] is the configuration; prints {entry point: outcome} as JSON.
_CHILD = r"""
import asyncio, json, socket, ssl, struct, sys

cfg = json.loads(sys.argv[1])


def inject():
    if cfg["patch"] == "truststore":
        import truststore
        truststore.inject_into_ssl()
        return
    # A patch of the gevent kind: a subclass, bound in the original's place, that adds the OS
    # store to every context (ssl.py's setters then recurse through the rebound name).
    class Patched(ssl.SSLContext):
        def __new__(cls, protocol=ssl.PROTOCOL_TLS_CLIENT, *args, **kwargs):
            ctx = super().__new__(cls, protocol, *args, **kwargs)
            ctx.load_verify_locations(cafile=cfg["os_store"])
            return ctx

    ssl.SSLContext = Patched


if cfg["order"] == "before":
    inject()
import safepg, safepg.asyncpg, safepg.sqlalchemy
if cfg["order"] == "after":
    inject()
assert ssl.SSLContext.__module__ != "ssl"

pinned, host, port = cfg["pinned"], "localhost", cfg["port"]
kw = dict(host=host, port=port, user=cfg["user"], password=cfg["password"],
          database=cfg["dbname"], sslrootcert=pinned, timeout=10)


def outcome(ex):
    # The first safepg error along the causes (SQLAlchemy wraps them), else the error's class.
    seen = ex
    while seen is not None:
        if type(seen).__module__.startswith("safepg") or isinstance(seen, ssl.SSLError):
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return f"{type(ex).__name__}: {str(ex)[:200]}"


def handshake(ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        with ctx.wrap_socket(sock, server_hostname=host):
            pass


async def connect(**extra):
    conn = await safepg.asyncpg.connect(**{**kw, **extra})
    await conn.close()


async def pool():
    p = await safepg.asyncpg.create_pool(**kw, min_size=1, max_size=1)
    await p.close()


async def engine():
    e = safepg.sqlalchemy.create_async_engine(cfg["url"])
    try:
        async with e.connect():
            pass
    finally:
        await e.dispose()


cases = {
    # The control: the injected class alone, with no anchors loaded, trusts the server.
    "injected ssl.SSLContext": lambda: handshake(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)),
    "safepg.ssl_context": lambda: handshake(safepg.ssl_context(host, sslrootcert=pinned)),
    "safepg.ssl_context with sslcert": lambda: handshake(safepg.ssl_context(
        host, sslrootcert=pinned, sslcert=cfg["cert"], sslkey=cfg["key"])),
    "safepg.asyncpg.connect": lambda: asyncio.run(connect()),
    "safepg.asyncpg.connect with sslcert": lambda: asyncio.run(
        connect(sslcert=cfg["cert"], sslkey=cfg["key"])),
    "safepg.asyncpg.create_pool": lambda: asyncio.run(pool()),
    "postgresql+asyncpg engine": lambda: asyncio.run(engine()),
    # libpq verifies here; safepg's diagnosis (a Python probe) must not call the chain trusted.
    "safepg.connect": lambda: safepg.connect(
        host=host, port=port, user=cfg["user"], password=cfg["password"], dbname=cfg["dbname"],
        sslrootcert=pinned, connect_timeout=10).close(),
}
results = {}
for name, case in cases.items():
    try:
        case()
        results[name] = "accepted"
    except BaseException as ex:
        results[name] = outcome(ex)
print(json.dumps(results))
"""


@pytest.mark.parametrize("patch", ["truststore", "subclass"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_an_injected_os_store_does_not_widen_pinned_trust(
    order: str, patch: str, server: PostgresServer, certs: CertificateShop, tmp_path: Path
) -> None:
    public = CertificateAuthority("public CA in the OS store")
    os_store = public.write_cert(tmp_path / "os-store.pem")
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=public)
    client = public.issue("app")
    cert, key = client.write(tmp_path / "client.crt", tmp_path / "client.key")
    url = server.url(scheme="postgresql+asyncpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SSL_CERT_"))}
    env.update(
        SSL_CERT_FILE=str(os_store),
        SSL_CERT_DIR=str(tmp_path / "no-such-dir"),
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    cfg = {
        "order": order,
        "patch": patch,
        "os_store": str(os_store),
        "pinned": str(server.ca_path),
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
        "cert": str(cert),
        "key": str(key),
        "url": url,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    # The OS store, as truststore sees it, holds the public CA: the widening is real.
    assert results.pop("injected ssl.SSLContext") == "accepted"
    expected = {
        "safepg.ssl_context": "SSLCertVerificationError",
        "safepg.ssl_context with sslcert": "SSLCertVerificationError",
        "safepg.asyncpg.connect": "UntrustedCertificateError",
        "safepg.asyncpg.connect with sslcert": "UntrustedCertificateError",
        "safepg.asyncpg.create_pool": "UntrustedCertificateError",
        "postgresql+asyncpg engine": "UntrustedCertificateError",
        "safepg.connect": "UntrustedCertificateError",
    }
    assert results == expected


_CALLERS_CONTEXT = r"""
import asyncio, json, ssl, sys

cfg = json.loads(sys.argv[1])
import safepg, safepg.asyncpg
ctx = ssl.create_default_context(cafile=cfg["pinned"])  # the caller's, before the patch
import truststore
truststore.inject_into_ssl()
try:
    asyncio.run(safepg.asyncpg.connect(
        host="localhost", port=cfg["port"], user=cfg["user"], password=cfg["password"],
        database=cfg["dbname"], ssl=ctx, timeout=10))
    print("connected")
except safepg.ConfigurationError as ex:
    print("refused:", ex)
"""


def test_a_context_asyncpg_would_take_for_no_tls_is_refused(
    server: PostgresServer, tmp_path: Path
) -> None:
    # A standard context made before truststore's patch: asyncpg, testing isinstance against
    # truststore's class, would connect without TLS. Refused before any network I/O.
    cfg = {
        "pinned": str(server.ca_path),
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SSL_CERT_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-c", _CALLERS_CONTEXT, json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("refused:"), proc.stdout
    assert "truststore._api.SSLContext" in proc.stdout
