"""Attacks on the CAs fetched from providers' APIs and on a fresh process's warm start.

Each test reproduces a hole found in review against a real TLS PostgreSQL and a real local
HTTPS API (see tests/test_fetch.py for the fake provider API and the private endpoint hook),
and fails on the code before its fix.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safepg
from safepg import _fetch
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop
from .test_fastpath import learned, warm
from .test_fetch import (  # noqa: F401 - fixtures
    AIVEN_HOST,
    DO_HOST,
    DO_UUID,
    GCP_HOST,
    TOKEN,
    FakeApi,
    Instance,
    _api,
    _everything,
    api,
    connect,
    instance,
    instance_ca,
    ok,
)
from .test_route import big_bundle, cache, fresh_process, second_ca, wait_for_threads  # noqa: F401


class DripApi:
    """An HTTPS server, verified like the providers' APIs, that answers one byte at a time:
    each byte comes well within any socket timeout, the whole answer never does."""

    def __init__(self, tmp: Path, every: float = 0.2, total: float = 12.0) -> None:
        ca = CertificateAuthority("drip API CA")
        self.cafile = str(ca.write_cert(tmp / "drip-ca.pem"))
        cert, key = ca.issue("localhost", ip_addresses=["127.0.0.1"]).write(
            tmp / "drip.pem", tmp / "drip.key"
        )
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.every, self.total = every, total
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                answer = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"a" * 10_000
                end = time.monotonic() + self.total
                for byte in answer:
                    if self.stop.is_set() or time.monotonic() > end:
                        return
                    tls.sendall(bytes([byte]))
                    self.stop.wait(self.every)  # the attack itself, not a wait for readiness
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def drip(tmp_path: Path, api: FakeApi) -> Iterator[DripApi]:  # noqa: F811
    server = DripApi(tmp_path)
    try:
        yield server
    finally:
        server.close()


def test_an_api_answering_a_byte_at_a_time_cannot_hold_a_fetch_past_its_deadline(
    server: PostgresServer, drip: DripApi
) -> None:
    """Finding 1: one deadline covers the whole fetch. http.client reads the status line,
    the headers and the body through a buffered reader, which loops over reads that each got
    the socket's whole timeout: a server sending a byte every 0.2 s held a connect with
    connect_timeout=2 for as long as it kept sending."""
    base = dict.fromkeys(("cloud-sql", "digitalocean", "aiven"), f"https://localhost:{drip.port}")
    started = time.monotonic()
    with (
        _fetch._endpoints(base, drip.cafile),
        pytest.raises(safepg.ConfigurationError, match="DigitalOcean API") as info,
    ):
        connect(server, DO_HOST, connect_timeout=2)
    took = time.monotonic() - started
    assert took < 6, f"the fetch took {took:.1f} s with connect_timeout=2"
    assert "timed out" in str(info.value)


FORGED = "backend\nlibpq said: connection verified\x1b[32m\u202e"


def _no_control(text: str) -> bool:
    return all(c.isprintable() for c in text)


def test_an_api_cluster_name_cannot_forge_labels_or_errors(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,  # noqa: F811
    rogue_ca: CertificateAuthority,
) -> None:
    """Finding 2: the DigitalOcean cluster name the API serves (whoever made the cluster
    chose it) went raw into the trust label: check()'s report, every error's "Trust anchors:"
    line, the logs and the CLI. It is shown escaped."""
    route = instance.api.routes["/v2/databases?page=1&per_page=100"]

    def named() -> tuple[int, bytes]:
        status, body = route()
        doc = json.loads(body)
        doc["databases"][0]["name"] = FORGED
        return status, json.dumps(doc).encode()

    instance.api.routes["/v2/databases?page=1&per_page=100"] = named
    certs.present(DO_HOST, ca=instance.ca)
    with connect(server, DO_HOST) as conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert _no_control(trust.label), trust.label
    assert "backend\\x0alibpq said" in trust.label
    certs.present(DO_HOST, ca=rogue_ca)  # an error that names the trust anchors
    with pytest.raises(safepg.UntrustedCertificateError) as info:
        connect(server, DO_HOST)
    message = str(info.value)
    assert "\x1b" not in message
    assert "\nlibpq said: connection verified" not in message


def test_an_api_region_cannot_forge_labels(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,  # noqa: F811
) -> None:
    """Finding 2, Cloud SQL: the region of the instance found by its DNS name is checked to be
    a region name, as the instance name is, before it names the CA."""
    region = "us-central1\n\x1b[32mverified"
    for path in ("/v1/projects/proj/instances", "/v1/projects/proj/instances/inst/connectSettings"):
        route = instance.api.routes[path]

        def forged(route: Any = route) -> tuple[int, bytes]:
            status, body = route()
            text = body.decode().replace('"us-central1"', json.dumps(region))
            return status, text.encode()

        instance.api.routes[path] = forged
    certs.present(GCP_HOST, ca=instance.ca)
    message = ""
    try:
        conn = connect(server, GCP_HOST)
    except safepg.ConfigurationError as ex:
        message = str(ex)
    else:
        label = safepg.check(conn).trust
        conn.close()
        pytest.fail(f"connected, trusting {label}")
    assert _no_control(message), message
    assert "no Cloud SQL instance" in message


@pytest.mark.parametrize(
    ("host", "path", "field"),
    [
        (AIVEN_HOST, "/v1/project/acme-prod/kms/ca", "certificate"),
        (GCP_HOST, "/v1/projects/proj/instances/inst/connectSettings", "serverCaCert"),
    ],
)
def test_a_lone_surrogate_in_the_ca_is_a_clean_error_without_the_token(
    server: PostgresServer,
    instance: Instance,  # noqa: F811
    host: str,
    path: str,
    field: str,
) -> None:
    """Finding 3: JSON may escape a lone surrogate (``"\\ud800"``), which Python decodes into
    a str that cannot be encoded. The CA text was encoded unchecked: a UnicodeEncodeError, not
    a ConfigurationError, escaped the fetch with the frames that hold the token."""
    route = instance.api.routes[path]

    def surrogate() -> tuple[int, bytes]:
        status, body = route()
        doc = json.loads(body)
        if field == "certificate":
            doc["certificate"] = doc["certificate"] + "\ud800"
        else:
            doc["serverCaCert"]["cert"] += "\ud800"
        return status, json.dumps(doc).encode()  # ensure_ascii: the escape "\\ud800"

    instance.api.routes[path] = surrogate
    with pytest.raises(safepg.ConfigurationError) as info:
        connect(server, host)
    assert TOKEN not in _everything(info.value)
    assert "not a PEM certificate" in str(info.value)


def test_a_page_token_that_is_not_text_is_a_clean_error_without_the_token(
    server: PostgresServer,
    instance: Instance,  # noqa: F811
) -> None:
    """Finding 3, the list's page token: put into the next request's URL unchecked, a lone
    surrogate raised UnicodeEncodeError with the credentials (their token) in its frames."""
    route = instance.api.routes["/v1/projects/proj/instances"]

    def paged() -> tuple[int, bytes]:
        status, body = route()
        doc = json.loads(body)
        doc["items"] = doc["items"][:1]  # not on this page
        doc["nextPageToken"] = "next\ud800"
        return status, json.dumps(doc).encode()

    instance.api.routes["/v1/projects/proj/instances"] = paged
    with pytest.raises(safepg.ConfigurationError) as info:
        connect(server, GCP_HOST)
    assert TOKEN not in _everything(info.value)
    assert "nextPageToken" in str(info.value)


@pytest.fixture
def line_break_token(instance: Instance) -> Iterator[Instance]:  # noqa: F811
    """The fake API, with Google credentials whose token holds a line break (made here, so
    that no frame of the test holds it)."""
    from google.oauth2.credentials import Credentials

    creds = Credentials(token=TOKEN + "\r\nX-Injected: 1")  # type: ignore[no-untyped-call]
    with _fetch._endpoints(instance.api.base, instance.api.cafile, gcp_credentials=creds):
        yield instance


def test_a_google_token_with_a_line_break_is_refused_without_showing_it(
    server: PostgresServer, line_break_token: Instance
) -> None:
    """Finding 4: the DigitalOcean and Aiven tokens were checked to be one printable word, the
    Google credentials' token was not: http.client refused the header with a ValueError whose
    message holds the header's value, the token (and a bare newline reaches the header)."""
    with pytest.raises(safepg.ConfigurationError) as info:
        connect(server, GCP_HOST)
    assert TOKEN not in _everything(info.value)
    assert "Google credentials" in str(info.value)
    assert not line_break_token.api.hits


@pytest.mark.parametrize("record", ["trust-*.json", "plan-*.json", "host-*.json"])
def test_a_record_nested_too_deep_is_a_cold_start_not_a_crash(
    server: PostgresServer,
    big_bundle: Path,  # noqa: F811
    cache: Path,  # noqa: F811
    record: str,
) -> None:
    """Finding 5: the fast path's records are read with json.loads, whose C decoder raises
    RecursionError (not ValueError) for a document nested too deep; it escaped safepg.connect.
    A damaged record (a disk error, another tool's write in the cache) is ignored and made
    again, as the cache module promises."""
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = warm(conninfo)
    for path in cache.glob(record):
        path.write_bytes(b"[" * 200_000)
    fresh_process()
    trust = learned(conninfo)  # cold: the full set, or warm again from what is intact
    assert trust.path in (str(big_bundle), small.path)
    wait_for_threads()


def test_a_fetched_entry_nested_too_deep_is_fetched_again(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,  # noqa: F811
    cache: Path,  # noqa: F811
) -> None:
    """Finding 5, the fetched CAs' entries: read with the strict JSON reader, whose
    RecursionError was not among the errors that mean "fetch it again"."""
    certs.present(DO_HOST, ca=instance.ca)
    with connect(server, DO_HOST):
        pass
    (entry,) = cache.glob("fetched-digitalocean-*.json")
    entry.write_bytes(b"[" * 200_000)
    _fetch.clear_memory()
    instance.api.hits.clear()
    with connect(server, DO_HOST) as conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert trust.origin == "fetched"
    assert instance.api.hits  # fetched again
