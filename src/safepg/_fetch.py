"""Per-instance CAs fetched from the provider's API: Google Cloud SQL, DigitalOcean, Aiven.

These providers issue a CA per instance, cluster or project, which no OS store holds. Each
serves it from an authenticated API that its users already hold credentials for, and their own
tools read it from there (the Cloud SQL connectors, ``doctl databases get-ca``,
``avn project ca-get``). safepg does the same, when the caller named no CA file:

- **Google Cloud SQL** (``*.sql.goog``): application default credentials (google-auth, the
  ``gcp`` extra) and the project from ``GOOGLE_CLOUD_PROJECT`` or the credentials. The instance
  whose ``dnsName``/``dnsNames`` hold the host is found with ``instances.list``, and its CA read
  from ``connectSettings`` (``serverCaCert.cert``), in every ``serverCaMode``.
  https://cloud.google.com/sql/docs/postgres/admin-api/rest/v1/connect/get and
  https://cloud.google.com/sql/docs/postgres/admin-api/rest/v1/instances/list
- **DigitalOcean** (``*.db.ondigitalocean.com``): ``DIGITALOCEAN_TOKEN`` (or
  ``DIGITALOCEAN_ACCESS_TOKEN``). The cluster whose connection host is the host is found with
  ``GET /v2/databases``, its CA read from ``GET /v2/databases/{uuid}/ca`` (``ca.certificate``,
  base64 of the PEM). https://docs.digitalocean.com/reference/api/digitalocean/#tag/Databases
- **Aiven** (``*.aivencloud.com``): ``AIVEN_TOKEN``. Service hosts are
  ``<service>-<project>.<zones>.aivencloud.com`` (https://aiven.io/docs/platform/ip-addresses),
  and both names may hold hyphens: the project is the one of ``GET /v1/project`` whose name
  ends the first label, confirmed by ``GET /v1/project/{project}/service/{service}`` naming the
  host. Its CA: ``GET /v1/project/{project}/kms/ca`` (``certificate``).
  https://api.aiven.io/doc/#tag/Project_Key_Management

The HTTP client is the standard library's (``http.client``): no new dependency, and every choice
is visible here. TLS is verified against the OS store, then certifi (as for any server safepg
does not know); there is no redirect; one deadline covers the whole fetch; a response is at most
`_MAX_BODY` bytes of strict JSON. The token is never logged, never in an error's message, its
cause, context or frames (see `_clean`).

What is fetched is checked as any trust file safepg writes (PEM as OpenSSL reads it, every
certificate a CA, none expired), written into safepg's private cache directory, keyed by
provider and instance, and reused until it nears expiry. Threads and processes fetching the
same key take a lock (a file lock across processes): one fetches, the others read its result.

Test redirection of the API endpoints is a private, in-process hook (`_endpoints`): nothing in
the environment or a URL chooses where trust comes from.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import _cache, _x509
from ._environ import getenv
from ._errors import ConfigurationError
from ._text import shown

if TYPE_CHECKING:
    import http.client

logger = logging.getLogger("safepg")

ProviderKey = Literal["cloud-sql", "digitalocean", "aiven"]
FETCHING: tuple[ProviderKey, ...] = ("cloud-sql", "digitalocean", "aiven")

# The providers' API endpoints. Tests replace them through `_endpoints` only.
_BASE: dict[str, str] = {
    "cloud-sql": "https://sqladmin.googleapis.com",
    "digitalocean": "https://api.digitalocean.com",
    "aiven": "https://api.aiven.io",
}
# The scope Cloud SQL Admin API reads need (connectSettings, instances.list).
GCP_ADMIN_SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"

# One fetch (all its requests and the credentials' refresh) never takes longer than this, nor
# longer than connect_timeout when one is set.
DEFAULT_TIMEOUT = 10.0
# A response body larger than this is refused: a CA is a few KiB, a page of a list some 100 KiB.
_MAX_BODY = 4 * 1024 * 1024
# List pages read at most, while looking for the instance or cluster of a host name.
_MAX_PAGES = 20
# A fetched CA is fetched again once its first certificate expires within this...
_REFRESH_BEFORE = dt.timedelta(days=30)
# ...but not more often than this.
_REFRESH_EVERY = dt.timedelta(hours=1)
# After libpq rejected a chain, the CA is fetched again at most this often per instance.
_REFETCH_EVERY = 30.0
_ENTRY_VERSION = 1


class _Overrides:
    """The private test hook: endpoint base URLs, the CA file that verifies them, credentials."""

    def __init__(self) -> None:
        self.base: dict[str, str] = {}
        self.cafile: str | None = None
        self.gcp_credentials: Any = None


_overrides = _Overrides()


@contextlib.contextmanager
def _endpoints(base: dict[str, str], cafile: str, *, gcp_credentials: Any = None) -> Iterator[None]:
    """Tests only: send the API requests to *base* (provider key -> ``https://host:port``),
    verified against *cafile*, and use *gcp_credentials* instead of google.auth.default()."""
    saved = (_overrides.base, _overrides.cafile, _overrides.gcp_credentials)
    _overrides.base, _overrides.cafile = dict(base), cafile
    _overrides.gcp_credentials = gcp_credentials
    try:
        yield
    finally:
        _overrides.base, _overrides.cafile, _overrides.gcp_credentials = saved


# --- errors without the token ------------------------------------------------------------------


def _clean(ex: ConfigurationError) -> ConfigurationError:
    """A fresh error with *ex*'s message only: no cause, context or traceback, whose frames
    hold the token (in the request headers) as locals."""
    return ConfigurationError(str(ex))


# --- HTTP ----------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise ConfigurationError(f"timed out after {self.seconds:g} s while {what}")
        return left


class _DeadlineReader(io.RawIOBase):
    """What http.client reads the answer through: each read waits at most what is left of the
    deadline. (A buffered read loops over reads, each given the socket's whole timeout: a
    server sending a byte at a time would otherwise hold the fetch for as long as it likes.)"""

    def __init__(self, sock: ssl.SSLSocket, deadline: _Deadline, what: str) -> None:
        # The socket's own reader: it holds the socket open until closed, as http.client wants.
        self._raw = sock.makefile("rb", buffering=0)
        self._sock, self._deadline, self._what = sock, deadline, what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.left(self._what))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """``conn.sock`` for http.client: sends and reads bounded by the one deadline."""

    def __init__(self, sock: ssl.SSLSocket, deadline: _Deadline, where: str) -> None:
        self._sock, self._deadline, self._where = sock, deadline, where

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.left(f"sending the request to {self._where}"))
        self._sock.sendall(data)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":  # pragma: no cover - http.client reads its answers in binary
            raise ValueError(f"unexpected mode {mode!r}")
        what = f"reading the answer of {self._where}"
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline, what))

    def close(self) -> None:
        self._sock.close()


def _tls_context() -> ssl.SSLContext:
    """Verify the API's own certificate: the OS trust store, then certifi."""
    from . import _stdssl, _trust

    cafile = _overrides.cafile or _trust._fallback().path
    # The standard library's own class: never one that truststore or gevent put in its place.
    ctx = _stdssl.client_context()
    # The API's certificate must chain to a trusted root and name the API's host.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    # TLS 1.0 and 1.1 are deprecated (RFC 8996).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=cafile)
    return ctx


def _strict_json(body: bytes) -> Any:
    """JSON as RFC 8259 says, no more: UTF-8, no NaN or Infinity, no duplicate keys."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


@dataclass(frozen=True)
class _Api:
    provider: ProviderKey
    what: str  # for messages: "the Cloud SQL Admin API"
    authorization: Callable[[], str]  # the Authorization header's value
    credential_hint: str  # which credential, how to check it, the CLI alternative


def _get(
    api: _Api,
    path: str,
    deadline: _Deadline,
    query: dict[str, str] | None = None,
    *,
    missing_ok: bool = False,
) -> Any:
    """GET *path* of *api* and return its JSON (None for a 404 with *missing_ok*). Raises
    ConfigurationError for anything but a 200 with a JSON body (which may hold the token in its
    frames: callers use `_clean`)."""
    import http.client  # not at import time: import safepg stays cheap

    base = urllib.parse.urlsplit(_overrides.base.get(api.provider) or _BASE[api.provider])
    target = path + ("?" + urllib.parse.urlencode(query) if query else "")
    where = f"{api.what} ({base.scheme}://{base.netloc}{path})"
    logger.debug("safepg: GET %s", where)
    conn = http.client.HTTPSConnection(
        base.hostname or "",
        base.port,
        timeout=deadline.left(f"connecting to {where}"),
        context=_tls_context(),
    )
    conn.set_debuglevel(0)  # http.client prints the request headers otherwise
    response: http.client.HTTPResponse | None = None
    try:
        conn.connect()
        if conn.sock is None:  # pragma: no cover - connect() made it
            raise ConfigurationError(f"could not reach {where}")
        conn.sock = _DeadlineSocket(conn.sock, deadline, where)
        conn.request(
            "GET",
            target,
            headers={
                "Authorization": api.authorization(),
                "Accept": "application/json",
                "User-Agent": "safepg",
            },
        )
        response = conn.getresponse()
        status = response.status
        length = response.getheader("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > _MAX_BODY):
            raise ConfigurationError(f"{where} answered with a body over {_MAX_BODY} bytes")
        body = b""
        while status == 200 and not response.isclosed():
            chunk = response.read(65536)
            if not chunk:
                break
            body += chunk
            if len(body) > _MAX_BODY:
                raise ConfigurationError(f"{where} answered with a body over {_MAX_BODY} bytes")
    except ConfigurationError:
        raise
    except ssl.SSLCertVerificationError as ex:
        raise ConfigurationError(
            f"could not verify {where}: {ex.verify_message}. safepg verifies the API's "
            "certificate against the OS trust store and certifi; update them, or check for "
            "something intercepting HTTPS."
        ) from None
    except (OSError, http.client.HTTPException) as ex:
        why = "timed out" if isinstance(ex, TimeoutError) else f"{type(ex).__name__}: {ex}"
        why = shown(why)  # may quote what the other end sent
        raise ConfigurationError(f"could not reach {where}: {why}") from None
    finally:
        if response is not None:
            response.close()
        conn.close()
    if status in (401, 403):
        raise ConfigurationError(
            f"{where} refused the credentials (HTTP {status}). {api.credential_hint}"
        )
    if status == 404 and missing_ok:
        return None
    if status == 404:
        raise ConfigurationError(f"{where} answered HTTP 404: no such resource, or no access")
    if status != 200:
        # A redirect too: never followed, it could lead anywhere.
        raise ConfigurationError(f"{where} answered HTTP {status}, not 200")
    try:
        return _strict_json(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise ConfigurationError(f"{where} answered with a body that is not JSON") from None


def _field(doc: Any, *keys: str, kind: type = str) -> Any:
    """doc[k1][k2]... of a JSON document, of type *kind*, or None."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc if isinstance(doc, kind) else None


def _host(name: str) -> str:
    return name.lower().removesuffix(".")


# --- checking what was fetched -----------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_text(text: str, what: str) -> bytes:
    """*text*, a PEM document from a JSON answer, as bytes. JSON can escape a lone surrogate
    (``"\\ud800"``), which no encoding takes: refused here as a ConfigurationError, which
    `fetch` cleans (any other error would carry the frames that hold the token)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{what} is not a PEM certificate that safepg reads as OpenSSL does (it holds an "
            "unpaired surrogate); nothing was written and nothing connected."
        ) from None


def _checked_pem(pem: bytes, what: str) -> tuple[bytes, dt.datetime]:
    """*pem* as canonical PEM of CA certificates none of which has expired, and the earliest
    expiry. Read as OpenSSL reads it: anything it could read otherwise is refused."""
    certs = _x509.parse_pem(pem)
    if not certs:
        raise ConfigurationError(
            f"{what} is not a PEM certificate that safepg reads as OpenSSL does; nothing was "
            "written and nothing connected."
        )
    now = _now()
    for cert in certs:
        if not _x509.is_ca(cert.der):
            raise ConfigurationError(
                f"{what} holds a certificate that is not a CA (no basicConstraints cA:TRUE); "
                "safepg does not trust it. Nothing connected."
            )
        if cert.not_after is None or cert.not_after <= now:
            raise ConfigurationError(
                f"{what} holds a certificate that has expired (or whose expiry cannot be read); "
                "safepg does not trust it. Nothing connected."
            )
    expiry = min(c.not_after for c in certs if c.not_after is not None)
    return b"".join(c.pem() for c in certs), expiry


# --- the providers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A CA fetched from a provider: canonical PEM, for which instance, and a label part."""

    pem: bytes
    instance: str  # project:region:instance, the cluster's uuid, the Aiven project
    name: str  # "Cloud SQL server CA for project:region:instance"


def _gcp_credentials(deadline: _Deadline) -> tuple[Any, str | None]:
    hint = _HINTS["cloud-sql"]
    creds = _overrides.gcp_credentials
    project: str | None = None
    if creds is None:
        try:
            import google.auth
            import google.auth.exceptions
        except ImportError:
            raise ConfigurationError(
                "fetching a Cloud SQL server CA needs google-auth: pip install "
                f"'safepg-tls[gcp]'. {hint}"
            ) from None
        try:
            # Outside the deadline: on a machine with no credentials configured, google-auth
            # may probe the GCE metadata server first (its own timeouts, GCE_METADATA_TIMEOUT).
            creds, project = google.auth.default(scopes=[GCP_ADMIN_SCOPE])
        except google.auth.exceptions.DefaultCredentialsError:
            raise ConfigurationError(
                f"no Google application default credentials were found. {hint}"
            ) from None
        except google.auth.exceptions.GoogleAuthError as ex:
            raise ConfigurationError(
                f"could not load the Google application default credentials "
                f"({type(ex).__name__}). {hint}"
            ) from None
    if not creds.valid:
        import google.auth.transport.requests

        session = google.auth.transport.requests.Request()

        def request(*args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = deadline.left("refreshing the Google credentials")
            return session(*args, **kwargs)

        try:
            creds.refresh(request)
        except Exception as ex:
            if not (type(ex).__module__ or "").startswith("google.auth"):
                raise
            raise ConfigurationError(
                f"could not refresh the Google credentials ({type(ex).__name__}). {hint}"
            ) from None
    return creds, getenv("GOOGLE_CLOUD_PROJECT") or project


def _gcp_api(creds: Any) -> _Api:
    def authorization() -> str:
        token = creds.token
        if not isinstance(token, str) or not token:
            raise ConfigurationError(f"the Google credentials gave no token. {_HINTS['cloud-sql']}")
        if not _TOKEN_TEXT.fullmatch(token):
            # Never into a header (http.client's refusal would quote it): never shown either.
            raise ConfigurationError(
                "the Google credentials gave a token with characters no access token has. "
                f"{_HINTS['cloud-sql']}"
            )
        return "Bearer " + token

    return _Api("cloud-sql", "the Cloud SQL Admin API", authorization, _HINTS["cloud-sql"])


# Cloud SQL ids: projects (optionally "domain.com:project"), regions, instances.
_GCP_ID = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?(?::[a-z0-9][a-z0-9-]{0,62})?")
_GCP_NAME = re.compile(r"[a-z][a-z0-9-]{0,97}")


def _gcp_names(settings: Any) -> set[str]:
    names = {_host(n) for n in [_field(settings, "dnsName")] if n}
    for mapping in _field(settings, "dnsNames", kind=list) or []:
        name = _field(mapping, "name")
        if name:
            names.add(_host(name))
    return names


def _gcp_settings(api: _Api, project: str, instance: str, deadline: _Deadline) -> Any:
    path = f"/v1/projects/{urllib.parse.quote(project, safe=':')}/instances/{instance}"
    return _get(api, path + "/connectSettings", deadline)


def _gcp_fetch(host: str | None, connection_name: str | None, deadline: _Deadline) -> Fetched:
    creds, project = _gcp_credentials(deadline)
    api = _gcp_api(creds)
    if connection_name is not None:
        project, region, instance = connection_name.rsplit(":", 2)
    else:
        if not project or host is None:
            raise ConfigurationError(
                "safepg needs the Google Cloud project to find the Cloud SQL instance of "
                f"{host}: set GOOGLE_CLOUD_PROJECT, or name the instance with "
                "safepg.gcp.server_ca('project:region:instance')."
            )
        if not _GCP_ID.fullmatch(project):
            raise ConfigurationError(
                "the Google Cloud project (GOOGLE_CLOUD_PROJECT, or the credentials') is not a "
                "project id: lowercase letters, digits and hyphens, optionally after "
                "'domain:'."
            )
        region, instance = _gcp_find(api, project, host, deadline)
    settings = _gcp_settings(api, project, instance, deadline)
    where = f"connectSettings of {project}:{region}:{instance}"
    got_region = _field(settings, "region")
    if got_region != region:
        raise ConfigurationError(f"the {where} name region {got_region!r}, not {region!r}")
    if host is not None and _host(host) not in _gcp_names(settings):
        raise ConfigurationError(
            f"the {where} do not name {host} among the instance's DNS names; safepg does not "
            "use that instance's CA for it."
        )
    cert = _field(settings, "serverCaCert", "cert")
    if not cert:
        raise ConfigurationError(f"the {where} hold no serverCaCert.cert")
    name = f"Cloud SQL server CA for {project}:{region}:{instance}"
    pem, _expiry = _checked_pem(
        _pem_text(cert, f"the serverCaCert of {where}"), f"the serverCaCert of {where}"
    )
    return Fetched(pem, f"{project}:{region}:{instance}", name)


def _gcp_find(api: _Api, project: str, host: str, deadline: _Deadline) -> tuple[str, str]:
    """The (region, instance) of *project* whose DNS names hold *host*."""
    path = f"/v1/projects/{urllib.parse.quote(project, safe=':')}/instances"
    query: dict[str, str] = {}
    found: list[tuple[str, str]] = []
    for _page in range(_MAX_PAGES):
        doc = _get(api, path, deadline, query)
        for item in _field(doc, "items", kind=list) or []:
            if _host(host) in _gcp_names(item):
                region, name = _field(item, "region"), _field(item, "name")
                # Both name the CA (its label, errors): names as Cloud SQL makes them only.
                if region and name and _GCP_NAME.fullmatch(region) and _GCP_NAME.fullmatch(name):
                    found.append((region, name))
        token = _field(doc, "nextPageToken")
        if not token:
            break
        if not re.fullmatch(r"[\x21-\x7e]{1,4096}", token):
            # It goes into the next request's URL (a lone surrogate cannot even be encoded).
            raise ConfigurationError(
                f"the Cloud SQL Admin API answered {project}'s instance list with a "
                "nextPageToken that is not one (not printable ASCII)"
            )
        query = {"pageToken": token}
    if len(found) != 1:
        raise ConfigurationError(
            f"{'no' if not found else 'more than one'} Cloud SQL instance of project "
            f"{project} has the DNS name {host}. Check the project (GOOGLE_CLOUD_PROJECT) and "
            "'gcloud sql instances describe INSTANCE --format=\"value(dnsName,dnsNames)\"', or "
            "name the instance with safepg.gcp.server_ca('project:region:instance')."
        )
    return found[0]


# An API token, as it may go into an Authorization header: one word of printable ASCII.
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")


def _env_token(*names: str) -> str | None:
    for name in names:
        value = getenv(name)
        if value:
            return value.strip()
    return None


def _token_api(provider: ProviderKey, names: tuple[str, ...], what: str, scheme: str) -> _Api:
    hint = _HINTS[provider]
    token = _env_token(*names)
    if not token:
        raise ConfigurationError(f"no {' or '.join(names)} in the environment. {hint}")
    if not _TOKEN_TEXT.fullmatch(token):
        raise ConfigurationError(f"{names[0]} holds characters no API token has. {hint}")
    return _Api(provider, what, lambda: f"{scheme} {token}", hint)


_DO_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DO_CONNECTIONS = (
    "connection",
    "private_connection",
    "standby_connection",
    "standby_private_connection",
)


def _do_fetch(host: str | None, cluster: str | None, deadline: _Deadline) -> Fetched:
    api = _token_api(
        "digitalocean",
        ("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN"),
        "the DigitalOcean API",
        "Bearer",
    )
    label = cluster
    if cluster is None:
        cluster, label = _do_find(api, host or "", deadline)
    doc = _get(api, f"/v2/databases/{cluster}/ca", deadline)
    encoded = _field(doc, "ca", "certificate")
    what = f"the CA of DigitalOcean cluster {label}"
    try:
        pem = base64.b64decode(encoded or "", validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{what} is not base64, as the API documents it") from None
    pem, _expiry = _checked_pem(pem, what)
    return Fetched(pem, cluster, f"DigitalOcean CA for cluster {label}")


def _do_find(api: _Api, host: str, deadline: _Deadline) -> tuple[str, str]:
    found: list[tuple[str, str]] = []
    for page in range(1, _MAX_PAGES + 1):
        doc = _get(api, "/v2/databases", deadline, {"page": str(page), "per_page": "100"})
        databases = _field(doc, "databases", kind=list) or []
        for db in databases:
            hosts = {_host(_field(db, c, "host") or "") for c in _DO_CONNECTIONS}
            uuid, name = _field(db, "id"), _field(db, "name")
            if _host(host) in hosts and uuid and _DO_UUID.fullmatch(uuid):
                # The name is whatever the cluster's creator typed: shown escaped.
                found.append((uuid, f"{shown(name)} ({uuid})" if name else uuid))
        if not _field(doc, "links", "pages", "next"):
            break
    if len(found) != 1:
        raise ConfigurationError(
            f"{'no' if not found else 'more than one'} DigitalOcean database cluster has the "
            f"host {host}. Check the token's account with 'doctl databases list', or name the "
            "cluster with safepg.digitalocean.cluster_ca('UUID')."
        )
    return found[0]


_AIVEN_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _aiven_fetch(host: str | None, project: str | None, deadline: _Deadline) -> Fetched:
    api = _token_api("aiven", ("AIVEN_TOKEN",), "the Aiven API", "aivenv1")
    if project is None:
        project = _aiven_find(api, host or "", deadline)
    doc = _get(api, f"/v1/project/{project}/kms/ca", deadline)
    cert = _field(doc, "certificate")
    what = f"the CA of Aiven project {project}"
    if not cert:
        raise ConfigurationError(f"{what}: the API's answer holds no certificate")
    pem, _expiry = _checked_pem(_pem_text(cert, what), what)
    return Fetched(pem, project, f"Aiven project CA for {project}")


def _aiven_find(api: _Api, host: str, deadline: _Deadline) -> str:
    """The project of an Aiven service host ``<service>-<project>.<zones>.aivencloud.com``."""
    first = _host(host).split(".")[0]
    doc = _get(api, "/v1/project", deadline)
    projects = [_field(p, "project_name") for p in _field(doc, "projects", kind=list) or []]
    found: list[str] = []
    for project in projects:
        if not project or not _AIVEN_NAME.fullmatch(project):
            continue
        service = first.removesuffix("-" + project)
        if service == first or not service or not _AIVEN_NAME.fullmatch(service):
            continue
        # The split is ambiguous when names hold hyphens: the service must name the host.
        answer = _get(api, f"/v1/project/{project}/service/{service}", deadline, missing_ok=True)
        hosts = {_host(_field(answer, "service", "service_uri_params", "host") or "")}
        for component in _field(answer, "service", "components", kind=list) or []:
            hosts.add(_host(_field(component, "host") or ""))
        if _host(host) in hosts:
            found.append(project)
    if len(found) != 1:
        raise ConfigurationError(
            f"{'no' if not found else 'more than one'} Aiven project of this token has a "
            f"service with the host {host}. Check with 'avn service list --project PROJECT', "
            "or name the project with safepg.aiven.project_ca('PROJECT')."
        )
    return found[0]


_HINTS: dict[str, str] = {
    "cloud-sql": (
        "Fetching a Cloud SQL server CA needs Google application default credentials that "
        "can read the instance (the Cloud SQL Client role, as for the Cloud SQL connectors; "
        "finding it by DNS name also needs cloudsql.instances.list, as in Cloud SQL "
        "Viewer): check them with "
        "'gcloud auth application-default print-access-token', set them up with 'gcloud auth "
        "application-default login' or GOOGLE_APPLICATION_CREDENTIALS. Or download the CA "
        "yourself: gcloud sql instances describe INSTANCE "
        '--format="value(serverCaCert.cert)" > server-ca.pem, and pass '
        "sslrootcert=server-ca.pem."
    ),
    "digitalocean": (
        "Fetching a DigitalOcean cluster's CA needs an API token with database:read in "
        "DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN): check it with 'doctl account get'. "
        "Or download the CA yourself: doctl databases get-ca CLUSTER_ID --format Certificate "
        "--no-header | base64 -d > ca.pem, and pass sslrootcert=ca.pem."
    ),
    "aiven": (
        "Fetching an Aiven project's CA needs an Aiven token in AIVEN_TOKEN: check it with "
        "'avn user info'. Or download the CA yourself: avn project ca-get --project PROJECT "
        "--target-filepath ca.pem, and pass sslrootcert=ca.pem."
    ),
}

_FETCHERS: dict[str, Callable[[str | None, str | None, _Deadline], Fetched]] = {
    "cloud-sql": _gcp_fetch,
    "digitalocean": _do_fetch,
    "aiven": _aiven_fetch,
}


# --- the cache ---------------------------------------------------------------------------------

T = TypeVar("T")
# Set while resolving on an event loop: a fetch must not run there (see `off_loop`).
_on_loop: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "safepg_fetch_on_loop", default=False
)


class _NeedsNetwork(Exception):
    """Internal: a fetch is due, and the caller is on an event loop."""


async def off_loop(work: Callable[[], T]) -> T:
    """Run *work* (it resolves trust) on the event loop while fetched CAs are cached and
    fresh, which is nearly always; in a thread when a fetch is due, which does network I/O."""
    token = _on_loop.set(True)
    try:
        return work()
    except _NeedsNetwork:
        pass
    finally:
        _on_loop.reset(token)
    return await asyncio.to_thread(work)


@dataclass(frozen=True)
class FetchedTrust:
    """A fetched CA as written in the cache: the path libpq reads, and its label."""

    path: str
    label: str
    provider: str
    instance: str
    expiry: dt.datetime
    fetched: dt.datetime


# (provider, key) -> what was last fetched or read for it.
_memo: dict[tuple[str, str], FetchedTrust] = {}
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_lock = threading.Lock()
# (provider, key) -> monotonic time of the last fetch forced by a rejected chain.
_refetched: dict[tuple[str, str], float] = {}


def _entry_path(provider: str, key: str) -> Path:
    digest = hashlib.sha256(f"{provider}\0{key}".encode()).hexdigest()[:32]
    return _cache.cache_dir() / f"fetched-{provider}-{digest}.json"


def _fresh(found: FetchedTrust, now: dt.datetime) -> bool:
    if found.expiry <= now:
        return False
    return found.expiry - now > _REFRESH_BEFORE or now - found.fetched < _REFRESH_EVERY


def _read_entry(provider: str, key: str) -> FetchedTrust | None:
    """The cached entry for *key*, if it is a private file of ours that reads back whole."""
    try:
        doc = _strict_json(_cache.read_private_file(_entry_path(provider, key)))
        if doc.get("version") != _ENTRY_VERSION or doc.get("key") != key:
            return None
        pem, expiry = _checked_pem(doc["pem"].encode("ascii"), "a cached CA")
        fetched = dt.datetime.fromisoformat(doc["fetched"])
        if fetched.tzinfo is None:
            return None
        path = _cache.write_trust_file(f"fetched-{provider}", pem)
        label = f"{doc['name']}, fetched {fetched.date().isoformat()}"
        return FetchedTrust(str(path), label, provider, doc["instance"], expiry, fetched)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigurationError):
        return None
    except RecursionError:  # nested too deep
        return None


def _unstored(name: str, ex: OSError) -> ConfigurationError:
    """The refusal for a fetched CA that cannot be stored where libpq reads it from."""
    return ConfigurationError(
        f"the CA fetched for {name} cannot be written to safepg's cache "
        f"({_cache.cache_dir()}): {ex.strerror or type(ex).__name__}. libpq reads trust anchors "
        "from a file, so nothing was connected. Free some space, or point SAFEPG_CACHE_DIR at "
        "a private directory that can be written."
    )


def _write_entry(provider: str, key: str, got: Fetched) -> FetchedTrust:
    _pem, expiry = _checked_pem(got.pem, got.name)
    fetched = _now().replace(microsecond=0)
    try:
        path = _cache.write_trust_file(f"fetched-{provider}", got.pem)
    except OSError as ex:
        raise _unstored(got.name, ex) from None
    doc = {
        "version": _ENTRY_VERSION,
        "provider": provider,
        "key": key,
        "instance": got.instance,
        "name": got.name,
        "fetched": fetched.isoformat(),
        "pem": got.pem.decode("ascii"),
    }
    try:
        _cache.write_private_file(_entry_path(provider, key), json.dumps(doc).encode())
    except OSError as ex:
        raise _unstored(got.name, ex) from None
    label = f"{got.name}, fetched {fetched.date().isoformat()}"
    return FetchedTrust(str(path), label, provider, got.instance, expiry, fetched)


@contextlib.contextmanager
def _locked(provider: str, key: str, deadline: _Deadline) -> Iterator[None]:
    """One fetcher per key: a thread lock, and a file lock across processes."""
    with _locks_lock:
        lock = _locks.setdefault((provider, key), threading.Lock())
    if not lock.acquire(timeout=deadline.left("waiting for another thread's fetch")):
        raise ConfigurationError(
            f"timed out after {deadline.seconds:g} s waiting for another thread's fetch"
        )
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: threads only
            yield
            return
        lock_path = _entry_path(provider, key).with_suffix(".lock")
        fd = os.open(
            lock_path,
            os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
            0o600,
        )
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    deadline.left("waiting for another process's fetch")
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock
    finally:
        lock.release()


def _key(provider: str, host: str | None, instance: str | None) -> str:
    return f"instance:{instance}" if instance is not None else f"host:{_host(host or '')}"


def _obtain(
    provider: str,
    host: str | None,
    instance: str | None,
    timeout: float | None,
    *,
    force: bool = False,
) -> FetchedTrust:
    key = _key(provider, host, instance)
    now = _now()
    memo = _memo.get((provider, key))
    if not force and memo is not None and _fresh(memo, now) and _cache.unchanged(memo.path):
        return memo
    if _on_loop.get():
        raise _NeedsNetwork
    deadline = _Deadline(min(timeout, DEFAULT_TIMEOUT) if timeout else DEFAULT_TIMEOUT)
    old = memo.path if memo is not None else None
    with _locked(provider, key, deadline):
        entry = _read_entry(provider, key)
        if entry is not None and _fresh(entry, now) and (not force or entry.path != old):
            # Fresh, or fetched anew by another thread or process while this one waited.
            _memo[(provider, key)] = entry
            return entry
        logger.info(
            "safepg: fetching the CA for %s from the provider's API (%s)",
            host or instance,
            provider,
        )
        try:
            got = _FETCHERS[provider](host, instance, deadline)
        except ConfigurationError as ex:
            if force or entry is None:
                raise
            # A refresh before expiry failed: the same CA serves until it expires (never
            # anything wider), and the API is asked again after _REFRESH_EVERY.
            logger.warning(
                "safepg: could not refresh %s (%s); using it until it expires on %s",
                entry.label,
                _clean(ex),
                entry.expiry.date().isoformat(),
            )
            found = dataclasses.replace(entry, fetched=now)
        else:
            found = _write_entry(provider, key, got)
    _memo[(provider, key)] = found
    return found


def fetch(
    provider: str,
    *,
    host: str | None = None,
    instance: str | None = None,
    timeout: float | None = None,
    force: bool = False,
) -> FetchedTrust:
    """The CA of *host* (or of *instance*), from the cache or fetched from the provider's API.

    Raises:
        ConfigurationError: what failed (credentials, the API, the CA's checks) and how to
            fix it; never holding the token, in its message or its frames.
    """
    try:
        found = _obtain(provider, host, instance, timeout, force=force)
    except ConfigurationError as ex:
        err = ex
    else:
        return found
    raise _clean(err)


def refetch(
    provider: str, host: str | None, instance: str | None, timeout: float | None
) -> FetchedTrust | None:
    """After libpq rejected a chain with a fetched CA: fetch it again (a rotation), at most
    every `_REFETCH_EVERY` seconds per instance. None when nothing new came (the same CA, or
    fetched again too recently): then the rejection stands."""
    key = (provider, _key(provider, host, instance))
    last = _refetched.get(key)
    if last is not None and time.monotonic() - last < _REFETCH_EVERY:
        return None
    _refetched[key] = time.monotonic()
    before = _memo.get(key)
    found = fetch(provider, host=host, instance=instance, timeout=timeout, force=True)
    if before is not None and found.path == before.path:
        return None
    return found


def clear_memory() -> None:
    """Forget what was fetched (the cache on disk stays)."""
    _memo.clear()
    _refetched.clear()


def rotated_plan(plan: Any) -> Any:
    """The connect loop's rotation hook: *plan* (a `_params.Plan`) with its fetched CA fetched
    once more, after libpq rejected the server's chain with it; or None (nothing to retry).

    Only a plan whose trust is one fetched CA (origin ``"fetched"``) is retried, with the CA
    the provider serves now: never anything wider. The connect loop retries at most once.
    A failed fetch is logged, and None returned: libpq's rejection stands.
    """
    from . import providers
    from ._trust import TrustSource

    if plan.trust.origin != "fetched":
        return None
    hosts = {t.host for t in plan.targets if not t.socket}
    if len(hosts) != 1:
        return None
    host = hosts.pop()
    profile = providers.profile_for_host(host)
    if profile is None or profile.trust != "fetched":
        return None
    try:
        found = refetch(profile.key, host, None, plan.timeout)
    except ConfigurationError as ex:
        # The rejection stands, as libpq reported it; raised from here, this error would
        # carry libpq's (and its connection snapshot) as its context.
        logger.warning("safepg: could not fetch the CA of %s again: %s", host, ex)
        return None
    if found is None:
        return None
    logger.info("safepg: %s did not verify with its cached CA; fetched again: %s", host, found)
    trust = TrustSource(found.path, found.label, "fetched")
    params = {**plan.params, "sslrootcert": trust.path}
    return dataclasses.replace(plan, trust=trust, params=params)
