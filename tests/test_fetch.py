"""CAs fetched from the provider's API (Cloud SQL, DigitalOcean, Aiven), for real and offline.

A local HTTPS server answers each provider's documented API shapes, over TLS that safepg
verifies against a test CA it is pointed at through the private in-process hook
(`safepg._fetch._endpoints`); the real TLS PostgreSQL server presents a certificate from the
"instance" CA under the provider's host name, dialled at 127.0.0.1 with ``hostaddr``.
"""

from __future__ import annotations

import base64
import datetime as dt
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import ssl
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

import safepg
from safepg import _cache, _fetch
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

TOKEN = "SeCrEt-T0ken-4f9d1c"
GCP_HOST = "1a23b4cd5e67.1a2b345c6d27.us-central1.sql.goog"
DO_HOST = "db-postgresql-fra1-12345-do-user-678-0.b.db.ondigitalocean.com"
DO_UUID = "9cc10173-e9ea-4176-9dbc-a4cee4c4ff30"
AIVEN_HOST = "pg-main-acme-prod.a.aivencloud.com"


Route = Callable[[], tuple[int, bytes]]


class FakeApi:
    """One HTTPS server answering as the three providers' APIs; routes set per test."""

    def __init__(self, tmp: Path) -> None:
        self.tls_ca = CertificateAuthority("fake API CA")
        self.cafile = str(self.tls_ca.write_cert(tmp / "api-ca.pem"))
        cert, key = self.tls_ca.issue("localhost", ip_addresses=["127.0.0.1"]).write(
            tmp / "api.pem", tmp / "api.key"
        )
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self.no_length: set[str] = set()  # paths answered without Content-Length
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api.hits.append(self.path)
                route = api.routes.get(self.path)
                auth = self.headers.get("Authorization", "")
                if route is None:
                    status, body = 404, b'{"error": "not found"}'
                elif not auth.endswith(" " + TOKEN):
                    status, body = 401, b'{"message": "bad token"}'
                else:
                    status, body = route()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if self.path not in api.no_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # Google's OAuth token endpoint, for ADC refreshes
                api.hits.append("POST " + self.path)
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = json.dumps(
                    {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"}
                ).encode()
                self.send_response(200 if self.path == "/token" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> dict[str, str]:
        url = f"https://localhost:{self.port}"
        return {"cloud-sql": url, "digitalocean": url, "aiven": url}

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(doc: Any) -> Route:
    return lambda: (200, json.dumps(doc).encode())


@pytest.fixture(scope="module")
def _api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApi]:
    api = FakeApi(tmp_path_factory.mktemp("api"))
    yield api
    api.close()


class Instance:
    """An "instance" CA, and the API answers that serve it."""

    def __init__(self, api: FakeApi, ca: CertificateAuthority) -> None:
        self.api = api
        self.ca = ca
        self.serve(ca.cert_pem)

    def serve(self, pem: bytes) -> None:
        text = pem.decode()
        self.api.routes.update(
            {
                "/v1/projects/proj/instances": ok(
                    {
                        "kind": "sql#instancesList",
                        "items": [
                            {"name": "other", "region": "us-east1", "dnsName": "x.sql.goog."},
                            {
                                "kind": "sql#instance",
                                "name": "inst",
                                "region": "us-central1",
                                "connectionName": "proj:us-central1:inst",
                                "dnsName": GCP_HOST + ".",
                                "dnsNames": [
                                    {
                                        "name": GCP_HOST + ".",
                                        "connectionType": "PUBLIC",
                                        "dnsScope": "INSTANCE",
                                    }
                                ],
                            },
                        ],
                    }
                ),
                "/v1/projects/proj/instances/inst/connectSettings": ok(
                    {
                        "kind": "sql#connectSettings",
                        "serverCaCert": {"kind": "sql#sslCert", "cert": text},
                        "region": "us-central1",
                        "databaseVersion": "POSTGRES_16",
                        "dnsName": GCP_HOST + ".",
                        "serverCaMode": "GOOGLE_MANAGED_CAS_CA",
                    }
                ),
                "/v2/databases?page=1&per_page=100": ok(
                    {
                        "databases": [
                            {
                                "id": DO_UUID,
                                "name": "backend",
                                "engine": "pg",
                                "connection": {
                                    "host": DO_HOST,
                                    "port": 25060,
                                    "password": "not-shown",
                                    "ssl": True,
                                },
                                "private_connection": {"host": "private-" + DO_HOST},
                            }
                        ],
                        "links": {},
                        "meta": {"total": 1},
                    }
                ),
                f"/v2/databases/{DO_UUID}/ca": ok(
                    {"ca": {"certificate": base64.b64encode(pem).decode()}}
                ),
                "/v1/project": ok(
                    {"projects": [{"project_name": "prod"}, {"project_name": "acme-prod"}]}
                ),
                "/v1/project/acme-prod/service/pg-main": ok(
                    {"service": {"service_uri_params": {"host": AIVEN_HOST, "port": "12691"}}}
                ),
                "/v1/project/acme-prod/kms/ca": ok({"certificate": text}),
            }
        )


@pytest.fixture
def api(_api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    from google.oauth2.credentials import Credentials

    _api.routes.clear()
    _api.hits.clear()
    _fetch.clear_memory()
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj")
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", TOKEN)
    monkeypatch.setenv("AIVEN_TOKEN", TOKEN)
    creds = Credentials(token=TOKEN)  # type: ignore[no-untyped-call]
    with _fetch._endpoints(_api.base, _api.cafile, gcp_credentials=creds):
        yield _api
    _fetch.clear_memory()


@pytest.fixture(scope="module")
def instance_ca() -> CertificateAuthority:
    return CertificateAuthority("instance CA")


@pytest.fixture
def instance(api: FakeApi, instance_ca: CertificateAuthority) -> Instance:
    return Instance(api, instance_ca)


def connect(server: PostgresServer, host: str, **kwargs: Any) -> psycopg.Connection[Any]:
    params: dict[str, Any] = {
        "host": host,
        "hostaddr": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
        "connect_timeout": 5,
    }
    return safepg.connect(**{**params, **kwargs})


def present(certs: CertificateShop, host: str, ca: CertificateAuthority) -> None:
    certs.present(host, ca=ca)


# --- first fetch and connect, per provider -----------------------------------------------------


@pytest.mark.parametrize(
    ("host", "calls", "label"),
    [
        (
            GCP_HOST,
            ["/v1/projects/proj/instances", "/v1/projects/proj/instances/inst/connectSettings"],
            "Cloud SQL server CA for proj:us-central1:inst, fetched ",
        ),
        (
            DO_HOST,
            ["/v2/databases?page=1&per_page=100", f"/v2/databases/{DO_UUID}/ca"],
            f"DigitalOcean CA for cluster backend ({DO_UUID}), fetched ",
        ),
        (
            AIVEN_HOST,
            [
                "/v1/project",
                # "pg-main-acme" in "prod", then "pg-main" in "acme-prod": both could be it.
                "/v1/project/prod/service/pg-main-acme",
                "/v1/project/acme-prod/service/pg-main",
                "/v1/project/acme-prod/kms/ca",
            ],
            "Aiven project CA for acme-prod, fetched ",
        ),
    ],
)
def test_first_fetch_connects_verified_and_is_cached(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    host: str,
    calls: list[str],
    label: str,
) -> None:
    present(certs, host, instance.ca)
    with connect(server, host) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        trust = safepg.check(conn).trust
    assert instance.api.hits == calls
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert trust is not None
    assert trust.label.startswith(label)
    assert trust.label.endswith(today)
    assert trust.origin == "fetched"
    # Private, in the cache, holding just the instance CA.
    st = os.stat(trust.path)
    assert st.st_mode & 0o077 == 0
    assert Path(trust.path).read_bytes() == instance.ca.cert_pem.replace(b"\r", b"")
    # resolve_trust() names it too, without another API call; so does a new process's memory.
    resolved = safepg.resolve_trust(host=host, hostaddr="127.0.0.1")
    assert resolved.label == trust.label
    _fetch.clear_memory()
    with connect(server, host):
        pass
    assert instance.api.hits == calls


def test_gcp_cas_chain_and_the_fast_path(
    server: PostgresServer, certs: CertificateShop, api: FakeApi
) -> None:
    """A CAS-based CA (GOOGLE_MANAGED_CAS_CA): serverCaCert.cert holds the regional
    intermediate and the root. Warm connects use the fast path's narrowed file, still named."""
    root = CertificateAuthority("CAS root")
    regional = root.intermediate("CAS regional CA")
    Instance(api, root).serve(regional.cert_pem + root.cert_pem)
    certs.present(GCP_HOST, ca=regional)
    with connect(server, GCP_HOST) as conn:
        first = safepg.check(conn).trust
    with connect(server, GCP_HOST) as conn:
        warm = safepg.check(conn).trust
    assert first is not None
    assert warm is not None
    assert first.origin == warm.origin == "fetched"
    assert warm.label.startswith("Cloud SQL server CA for proj:us-central1:inst, fetched ")
    assert api.hits.count("/v1/projects/proj/instances/inst/connectSettings") == 1
    # A rotation while warm: the narrowed attempt fails, the CA is fetched once more.
    root2 = CertificateAuthority("CAS root 2")
    regional2 = root2.intermediate("CAS regional CA 2")
    Instance(api, root2).serve(regional2.cert_pem + root2.cert_pem)
    certs.present(GCP_HOST, ca=regional2)
    with connect(server, GCP_HOST):
        pass
    assert api.hits.count("/v1/projects/proj/instances/inst/connectSettings") == 2


def test_gcp_explicit_instance(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    import safepg.gcp

    path = safepg.gcp.server_ca("proj:us-central1:inst")
    assert instance.api.hits == ["/v1/projects/proj/instances/inst/connectSettings"]
    present(certs, GCP_HOST, instance.ca)
    with connect(server, GCP_HOST, sslrootcert=path):
        pass


def test_gcp_application_default_credentials(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """google.auth.default() for real: a service account key file, whose token is obtained at
    its token_uri (the fake API; google-auth's requests verify it through REQUESTS_CA_BUNDLE)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    adc = tmp_path / "adc.json"
    adc.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "proj",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "safepg@proj.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"https://localhost:{instance.api.port}/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", instance.api.cafile)
    present(certs, GCP_HOST, instance.ca)
    with (
        _fetch._endpoints(instance.api.base, instance.api.cafile),
        connect(server, GCP_HOST) as conn,
    ):
        trust = safepg.check(conn).trust
    assert instance.api.hits[0] == "POST /token"
    assert trust is not None
    assert trust.label.startswith("Cloud SQL server CA for proj:us-central1:inst")


def test_explicit_do_and_aiven(instance: Instance) -> None:
    import safepg.aiven
    import safepg.digitalocean

    do = safepg.digitalocean.cluster_ca(DO_UUID)
    aiven = safepg.aiven.project_ca("acme-prod")
    assert Path(do).read_bytes() == Path(aiven).read_bytes() == instance.ca.cert_pem
    with pytest.raises(safepg.ConfigurationError, match="not a DigitalOcean cluster id"):
        safepg.digitalocean.cluster_ca("../../v2/account")


# --- rotation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [None, False])
def test_rotated_ca_is_fetched_once_more(
    server: PostgresServer, certs: CertificateShop, instance: Instance, fast_path: bool | None
) -> None:
    # Without the fast path the fetched CA is the only attempt; with it, a narrowed one first.
    present(certs, GCP_HOST, instance.ca)
    with connect(server, GCP_HOST, fast_path=fast_path):
        pass
    rotated = CertificateAuthority("instance CA, rotated")
    instance.serve(rotated.cert_pem)
    present(certs, GCP_HOST, rotated)
    instance.api.hits.clear()
    with connect(server, GCP_HOST, fast_path=fast_path) as conn:
        trust = safepg.check(conn).trust
    assert instance.api.hits == [
        "/v1/projects/proj/instances",
        "/v1/projects/proj/instances/inst/connectSettings",
    ]
    assert trust is not None
    assert Path(trust.path).read_bytes() == rotated.cert_pem


def test_failed_refetch_leaves_the_verification_error(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    rogue_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API fails during a rotation: libpq's rejection stands, and the error holds no trace
    of the connection (whose snapshot holds the password) through a fetch error's context."""
    present(certs, DO_HOST, instance.ca)
    with connect(server, DO_HOST):
        pass
    present(certs, DO_HOST, rogue_ca)
    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = lambda: (503, b"{}")
    with pytest.raises(safepg.UntrustedCertificateError) as info:
        connect(server, DO_HOST)
    assert "could not fetch the CA of" in caplog.text
    chain: list[BaseException] = []
    ex: BaseException | None = info.value
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    assert all(server.password not in repr((e, vars(e))) for e in chain)
    assert not any(isinstance(e, safepg.ConfigurationError) for e in chain)


def test_rotation_with_psycopg2(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    from safepg import psycopg2 as safe_psycopg2

    kwargs: dict[str, Any] = {
        "host": AIVEN_HOST,
        "hostaddr": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
    }
    present(certs, AIVEN_HOST, instance.ca)
    safe_psycopg2.connect(**kwargs).close()
    rotated = CertificateAuthority("instance CA, rotated for psycopg2")
    instance.serve(rotated.cert_pem)
    present(certs, AIVEN_HOST, rotated)
    instance.api.hits.clear()
    safe_psycopg2.connect(**kwargs).close()
    assert instance.api.hits.count("/v1/project/acme-prod/kms/ca") == 1


def test_rotation_never_widens(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    rogue_ca: CertificateAuthority,
) -> None:
    """A server the fetched CA did not sign: one refetch (the same CA), then the usual error."""
    present(certs, GCP_HOST, rogue_ca)
    with pytest.raises(safepg.UntrustedCertificateError) as info:
        connect(server, GCP_HOST)
    assert "Cloud SQL server CA for proj:us-central1:inst" in str(info.value)
    assert instance.api.hits.count("/v1/projects/proj/instances/inst/connectSettings") == 2
    # Within the refetch interval, no more API calls: the rejection stands at once.
    instance.api.hits.clear()
    with pytest.raises(safepg.UntrustedCertificateError):
        connect(server, GCP_HOST)
    assert instance.api.hits == []


def test_rotation_is_retried_once_per_connect(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    rogue_ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even with no interval between refetches, one connect refetches once, and each refetch
    serves a new CA that does not verify the server either: one retry, then the error."""
    monkeypatch.setattr(_fetch, "_REFETCH_EVERY", 0.0)
    present(certs, DO_HOST, rogue_ca)
    served = iter(CertificateAuthority(f"CA {i}") for i in range(10))

    def new_ca() -> tuple[int, bytes]:
        pem = next(served).cert_pem
        return 200, json.dumps({"ca": {"certificate": base64.b64encode(pem).decode()}}).encode()

    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = new_ca
    with pytest.raises(safepg.UntrustedCertificateError):
        connect(server, DO_HOST)
    assert instance.api.hits.count(f"/v2/databases/{DO_UUID}/ca") == 2


# --- failures ------------------------------------------------------------------------------------


def _fails(server: PostgresServer, host: str, match: str) -> safepg.ConfigurationError:
    with pytest.raises(safepg.ConfigurationError, match=match) as info:
        connect(server, host)
    return info.value


def test_api_down(server: PostgresServer, api: FakeApi, closed_port: int) -> None:
    down = dict.fromkeys(api.base, f"https://localhost:{closed_port}")
    with _fetch._endpoints(down, api.cafile):
        _fails(server, DO_HOST, "could not reach the DigitalOcean API")


def test_api_slow_past_the_deadline(server: PostgresServer, api: FakeApi) -> None:
    api.release.clear()

    def stall() -> tuple[int, bytes]:
        api.release.wait(30)
        return 500, b"{}"

    api.routes["/v1/project"] = stall
    try:
        err = _fails(server, AIVEN_HOST, "timed out")
    finally:
        api.release.set()
    assert "Aiven API" in str(err)


def test_refresh_before_expiry_keeps_the_cached_ca_when_the_api_fails(
    server: PostgresServer,
    certs: CertificateShop,
    api: FakeApi,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CA nearing expiry is fetched again; if that fails, the same CA serves until it
    expires (with a warning); once it has expired, nothing does."""
    soon = CertificateAuthority(
        "expiring CA", not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=10)
    )
    Instance(api, soon)
    present(certs, DO_HOST, soon)
    with connect(server, DO_HOST):
        pass
    monkeypatch.setattr(_fetch, "_REFRESH_EVERY", dt.timedelta(0))
    api.routes[f"/v2/databases/{DO_UUID}/ca"] = lambda: (500, b"{}")
    api.hits.clear()
    with connect(server, DO_HOST):
        pass
    assert api.hits == ["/v2/databases?page=1&per_page=100", f"/v2/databases/{DO_UUID}/ca"]
    assert "could not refresh DigitalOcean CA for cluster" in caplog.text
    # Once expired, the cached copy is refused, and the failing API leaves nothing to use.
    monkeypatch.setattr(
        _fetch, "_now", lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=11)
    )
    _fetch.clear_memory()
    _fails(server, DO_HOST, "HTTP 500")


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials(server: PostgresServer, instance: Instance, status: int) -> None:
    instance.api.routes["/v1/projects/proj/instances"] = lambda: (status, b'{"error": {}}')
    err = _fails(server, GCP_HOST, f"refused the credentials \\(HTTP {status}\\)")
    assert "gcloud auth application-default" in str(err)


def test_wrong_token_is_refused_by_the_api(
    server: PostgresServer, instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", "wrong")
    _fails(server, DO_HOST, "HTTP 401")


@pytest.mark.parametrize(
    ("env", "host", "names"),
    [
        ("DIGITALOCEAN_TOKEN", DO_HOST, "DIGITALOCEAN_TOKEN or DIGITALOCEAN_ACCESS_TOKEN"),
        ("AIVEN_TOKEN", AIVEN_HOST, "AIVEN_TOKEN"),
    ],
)
def test_missing_credential(
    server: PostgresServer,
    api: FakeApi,
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    host: str,
    names: str,
) -> None:
    monkeypatch.delenv(env)
    err = _fails(server, host, f"no {names} in the environment")
    assert "sslrootcert=ca.pem" in str(err)
    assert api.hits == []


def test_missing_gcp_credentials(
    server: PostgresServer, api: FakeApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with _fetch._endpoints(api.base, api.cafile):
        err = _fails(server, GCP_HOST, "Google application default credentials")
    assert "gcloud sql instances describe" in str(err)


def test_malformed_project_is_refused(
    server: PostgresServer, instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj/instances/x?")
    _fails(server, GCP_HOST, "is not a project id")
    assert instance.api.hits == []


def test_not_a_ca(server: PostgresServer, instance: Instance) -> None:
    leaf = instance.ca.issue("leaf.example")
    instance.serve(leaf.cert_pem)
    _fails(server, GCP_HOST, "not a CA")


def test_expired_ca(server: PostgresServer, instance: Instance) -> None:
    old = CertificateAuthority(
        "expired CA", not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    )
    instance.serve(old.cert_pem)
    _fails(server, AIVEN_HOST, "expired")


def test_not_pem(server: PostgresServer, instance: Instance) -> None:
    instance.serve(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    _fails(server, DO_HOST, "not a PEM certificate")


def test_not_json_and_duplicate_keys(server: PostgresServer, instance: Instance) -> None:
    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = lambda: (200, b'{"ca": 1, "ca": 2}')
    _fails(server, DO_HOST, "not JSON")
    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = lambda: (200, b"[" * 100_000)
    _fails(server, DO_HOST, "not JSON")
    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = lambda: (200, b'{"ca": NaN}')
    _fails(server, DO_HOST, "not JSON")


def test_instance_must_name_the_host(server: PostgresServer, instance: Instance) -> None:
    """connectSettings of the instance found must hold the host among its DNS names."""
    route = instance.api.routes["/v1/projects/proj/instances/inst/connectSettings"]

    def elsewhere() -> tuple[int, bytes]:
        status, body = route()
        doc = json.loads(body)
        doc["dnsName"] = "other.sql.goog."
        return status, json.dumps(doc).encode()

    instance.api.routes["/v1/projects/proj/instances/inst/connectSettings"] = elsewhere
    _fails(server, GCP_HOST, "do not name")


def test_redirect_is_not_followed(server: PostgresServer, instance: Instance) -> None:
    """A redirect could lead anywhere: it is an error, never followed."""
    target = f"/v2/databases/{DO_UUID}/ca"
    instance.api.routes["/elsewhere"] = instance.api.routes[target]
    instance.api.routes[target] = lambda: (302, b"{}")
    _fails(server, DO_HOST, "HTTP 302, not 200")
    assert "/elsewhere" not in instance.api.hits


def test_body_size_is_limited(
    server: PostgresServer, instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fetch, "_MAX_BODY", 1000)
    big = json.dumps({"projects": [{"project_name": "p" * 60}] * 40}).encode()
    instance.api.routes["/v1/project"] = lambda: (200, big)
    _fails(server, AIVEN_HOST, "body over 1000 bytes")
    instance.api.no_length.add("/v1/project")  # read until the server closes: counted too
    try:
        _fails(server, AIVEN_HOST, "body over 1000 bytes")
    finally:
        instance.api.no_length.clear()


def test_aiven_service_must_name_the_host(server: PostgresServer, instance: Instance) -> None:
    """The project is taken only when its service of that name serves this very host."""
    instance.api.routes["/v1/project/acme-prod/service/pg-main"] = ok(
        {"service": {"service_uri_params": {"host": "pg-main-acme-prod.b.aivencloud.com"}}}
    )
    _fails(server, AIVEN_HOST, "no Aiven project of this token has a service")
    assert "/v1/project/acme-prod/kms/ca" not in instance.api.hits


def test_api_certificate_is_verified(
    server: PostgresServer, instance: Instance, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The API's own TLS is verified: against another CA, nothing is fetched."""
    other = str(rogue_ca.write_cert(tmp_path / "rogue.pem"))
    with _fetch._endpoints(instance.api.base, other):
        _fails(server, DO_HOST, "could not verify the DigitalOcean API")


def test_no_endpoint_from_the_environment(
    instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the in-process hook, the real endpoints: nothing in the environment moves them."""
    assert _fetch._BASE["digitalocean"] == "https://api.digitalocean.com"
    for name in ("SAFEPG_DIGITALOCEAN_API", "DIGITALOCEAN_API_URL", "SAFEPG_API_CAFILE"):
        monkeypatch.setenv(name, "https://localhost:1")
    assert _fetch._overrides.base == instance.api.base


# --- the token never shows -----------------------------------------------------------------------


def _everything(err: BaseException) -> str:
    """The error's message, causes, contexts, and every local of every frame of its traceback."""
    out = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        ex = todo.pop()
        if ex is None or id(ex) in seen:
            continue
        seen.add(id(ex))
        out.append(repr(ex))
        out.append("".join(traceback.format_exception(ex)))
        tb = ex.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                out.append(repr(value))
                if hasattr(value, "__dict__"):
                    out.append(repr(vars(value)))
            tb = tb.tb_next
        todo += [ex.__cause__, ex.__context__]
    return "\n".join(out)


@pytest.mark.parametrize("host", [DO_HOST, AIVEN_HOST, GCP_HOST])
def test_token_never_in_errors_logs_or_frames(
    server: PostgresServer,
    instance: Instance,
    caplog: pytest.LogCaptureFixture,
    host: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="safepg")
    instance.serve(instance.ca.issue("leaf.example").cert_pem)  # fails after the requests
    with pytest.raises(safepg.ConfigurationError) as info:
        connect(server, host)
    text = _everything(info.value)
    assert "not a CA" in text
    assert TOKEN not in text
    assert TOKEN not in caplog.text
    for status in (401, 500):
        for path in list(instance.api.routes):
            instance.api.routes[path] = lambda status=status: (status, TOKEN.encode())  # type: ignore[misc]
        with pytest.raises(safepg.ConfigurationError) as info:
            connect(server, host)
        assert TOKEN not in _everything(info.value)
    gc.collect()


# --- every driver --------------------------------------------------------------------------------


def test_every_driver_uses_the_fetched_ca(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    """psycopg async, psycopg2, the pool, SQLAlchemy and ssl_context (asyncpg's) resolve the
    same fetched CA, with one fetch for all."""
    import asyncio

    present(certs, AIVEN_HOST, instance.ca)
    kwargs: dict[str, Any] = {
        "host": AIVEN_HOST,
        "hostaddr": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
    }

    async def async_psycopg() -> None:
        conn = await safepg.connect_async(**kwargs)
        await conn.close()

    asyncio.run(async_psycopg())
    from safepg import psycopg2 as safe_psycopg2

    safe_psycopg2.connect(**kwargs).close()
    from psycopg.conninfo import make_conninfo

    import safepg.sqlalchemy as sp
    from safepg.pool import ConnectionPool

    conninfo = make_conninfo("", **kwargs)
    with (
        ConnectionPool(conninfo, min_size=1, max_size=1, open=True) as pool,
        pool.connection() as conn,
    ):
        assert conn.execute("select 1").fetchone() == (1,)
    url = (
        f"postgresql://{server.user}:{server.password}@{AIVEN_HOST}:{server.port}/"
        f"{server.dbname}?hostaddr=127.0.0.1"
    )
    engine = sp.create_engine(url)
    with engine.connect() as sa_conn:
        assert sa_conn.exec_driver_sql("select 1").scalar() == 1
    engine.dispose()
    # asyncpg has no hostaddr to dial 127.0.0.1 under the provider's name: its context (from
    # the same resolution) holds the fetched CA, and only it.
    ctx = safepg.ssl_context(host=AIVEN_HOST)
    subjects = [str(c["subject"]) for c in ctx.get_ca_certs()]
    assert len(subjects) == 1
    assert "instance CA" in subjects[0]
    assert instance.api.hits.count("/v1/project/acme-prod/kms/ca") == 1


def test_async_connect_fetches_off_the_event_loop(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    """The API answers only once another task of the loop ran during the fetch: a fetch on
    the loop would stall until the deadline. Warm connects resolve on the loop."""
    import asyncio

    present(certs, DO_HOST, instance.ca)
    arrived, release = threading.Event(), threading.Event()
    route = instance.api.routes[f"/v2/databases/{DO_UUID}/ca"]

    def gated() -> tuple[int, bytes]:
        arrived.set()
        release.wait(30)
        return route()

    instance.api.routes[f"/v2/databases/{DO_UUID}/ca"] = gated

    async def ticker() -> None:
        while not arrived.is_set():
            await asyncio.sleep(0.01)
        release.set()

    async def main() -> None:
        tick = asyncio.create_task(ticker())
        conn = await safepg.connect_async(
            host=DO_HOST,
            hostaddr="127.0.0.1",
            port=server.port,
            user=server.user,
            password=server.password,
            dbname=server.dbname,
            connect_timeout=3,
        )
        await conn.close()
        await tick

    try:
        asyncio.run(main())
    finally:
        release.set()


# --- many at once --------------------------------------------------------------------------------


def rendezvous(api: FakeApi, path: str, n: int, wait: float = 1.0) -> None:
    """Hold the answers to *path* until *n* requests for it arrived, or *wait* seconds passed:
    a fetch per caller (no lock) answers at once, one fetch for all waits once."""
    route = api.routes[path]
    lock, arrived, all_in = threading.Lock(), [0], threading.Event()

    def gated() -> tuple[int, bytes]:
        with lock:
            arrived[0] += 1
            if arrived[0] >= n:
                all_in.set()
        all_in.wait(wait)
        return route()

    api.routes[path] = gated


def test_many_threads_fetch_once(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    present(certs, DO_HOST, instance.ca)
    rendezvous(instance.api, "/v2/databases?page=1&per_page=100", 12)
    paths: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def work() -> None:
        try:
            start.wait(30)
            paths.append(safepg.resolve_trust(host=DO_HOST, hostaddr="127.0.0.1").path)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(paths)) == 1
    assert instance.api.hits.count(f"/v2/databases/{DO_UUID}/ca") == 1
    assert Path(paths[0]).read_bytes() == instance.ca.cert_pem
    with connect(server, DO_HOST):
        pass


def _child(base: dict[str, str], cafile: str, cache: str, start: Any, queue: Any) -> None:
    os.environ["SAFEPG_CACHE_DIR"] = cache
    os.environ["AIVEN_TOKEN"] = TOKEN
    import safepg.providers  # everything imported before the race starts

    start.wait(60)
    with _fetch._endpoints(base, cafile):
        trust = safepg.resolve_trust(host=AIVEN_HOST, hostaddr="127.0.0.1")
    queue.put((trust.path, Path(trust.path).read_bytes()))


def test_many_processes_fetch_once(instance: Instance, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(4)
    rendezvous(instance.api, "/v1/project", 4)
    cache = os.environ["SAFEPG_CACHE_DIR"]
    args = (instance.api.base, instance.api.cafile, cache, start, queue)
    procs = [ctx.Process(target=_child, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert {r[1] for r in results} == {instance.ca.cert_pem}
    assert len({r[0] for r in results}) == 1
    assert instance.api.hits.count("/v1/project/acme-prod/kms/ca") == 1


# --- the CLI -------------------------------------------------------------------------------------


def _psql() -> str:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    if not found:
        pytest.skip("no psql installed")
    return str(found[-1])


def test_cli_ca_fetch_writes_a_file_psql_accepts(
    server: PostgresServer,
    certs: CertificateShop,
    instance: Instance,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from safepg._cli import main

    from .cli_json import run_json

    present(certs, GCP_HOST, instance.ca)
    out = tmp_path / "server-ca.pem"
    assert main(["ca", "--host", GCP_HOST, "--fetch", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() == instance.ca.cert_pem
    code, doc = run_json(capsys, "ca", "--host", GCP_HOST, "--fetch")
    assert code == 0
    assert doc["origin"] == "fetched"
    assert doc["label"].startswith("Cloud SQL server CA for proj:us-central1:inst")
    conninfo = (
        f"sslmode=verify-full sslrootcert={out} host={GCP_HOST} hostaddr=127.0.0.1 "
        f"port={server.port} user={server.user} dbname={server.dbname}"
    )
    done = subprocess.run(
        [_psql(), conninfo, "-Atc", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"],
        env={**os.environ, "PGPASSWORD": server.password},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "t"


def test_cli_ca_uses_the_cache_and_fetch_refreshes(
    instance: Instance, capsys: pytest.CaptureFixture[str]
) -> None:
    """`safepg ca` gives the path safepg would use (fetched once, then cached); --fetch asks
    the API again; --fetch for a host no API serves is refused."""
    from .cli_json import run_json

    ca_calls = f"/v2/databases/{DO_UUID}/ca"
    for _ in range(2):
        code, doc = run_json(capsys, "ca", "--host", DO_HOST)
        assert code == 0
        assert doc["origin"] == "fetched"
    assert instance.api.hits.count(ca_calls) == 1
    code, doc = run_json(capsys, "ca", "--host", DO_HOST, "--fetch")
    assert code == 0
    assert instance.api.hits.count(ca_calls) == 2
    code, doc = run_json(capsys, "ca", "--host", "db.example.com", "--fetch")
    assert code == 2
    assert "--fetch needs --host" in doc["error"]["message"]


def test_providers_lists_fetched(capsys: pytest.CaptureFixture[str]) -> None:
    from .cli_json import run_json

    code, doc = run_json(capsys, "providers")
    assert code == 0
    trust = {p["key"]: p["trust"] for p in doc["profiles"]}
    assert trust["cloud-sql"] == trust["digitalocean"] == trust["aiven"] == "fetched"
    from safepg._cli import main

    assert main(["providers"]) == 0
    assert "fetched from the provider's API" in capsys.readouterr().out


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("file locks and psql: POSIX")


def test_a_fetched_ca_that_cannot_be_stored_is_a_configuration_error(
    server: PostgresServer, certs: CertificateShop, instance: Instance
) -> None:
    # libpq reads trust anchors from a file: when the cache cannot take it (a full disk, here a
    # directory in the file's place), the connect fails as a ConfigurationError (an
    # OperationalError), never as a bare OSError, and without the token.
    present(certs, AIVEN_HOST, instance.ca)
    pem = instance.ca.cert_pem.replace(b"\r", b"")
    digest = hashlib.sha256(pem).hexdigest()[:32]
    (_cache.cache_dir() / f"fetched-aiven-{digest}.pem").mkdir(parents=True)
    with pytest.raises(
        safepg.ConfigurationError, match="cannot be written to safepg's cache"
    ) as info:
        connect(server, AIVEN_HOST)
    assert isinstance(info.value, psycopg.OperationalError)
    assert TOKEN not in str(info.value)


def test_a_fetched_host_does_not_end_the_list(instance: Instance) -> None:
    # Each host of a multi-host list gets its anchors: after a host whose CA is fetched, the
    # next host's (here Amazon RDS's bundled roots) are still added.
    from safepg import _trust

    found = _trust.resolve(None, "nothing", [DO_HOST, "mydb.abc123.eu-west-1.rds.amazonaws.com"])
    assert found.origin == "combined"
    assert "bundled Amazon RDS roots" in found.label
    assert instance.ca.cert_pem in Path(found.path).read_bytes()
