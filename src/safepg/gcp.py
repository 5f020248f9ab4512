"""Google Cloud SQL and AlloyDB IAM database authentication tokens as passwords
(``safepg-tls[gcp]``).

::

    import safepg, safepg.gcp

    conn = safepg.connect(
        host="10.1.2.3", verify_as="<the name in the instance's certificate>",
        user="app-sa@my-project.iam", dbname="app", password=safepg.gcp.IAMAuth(),
    )

`server_ca` gives the path of an instance's server CA, fetched from the Cloud SQL Admin API
(and cached), for ``sslrootcert``; `safepg.connect` does the same by itself for a ``*.sql.goog``
host when no CA file is named.

`IAMAuth` takes google-auth's application default credentials (``google.auth.default``) with
the ``sqlservice.login`` scope, refreshes them when they expire within *margin*, and gives
their access token. google-auth is imported on first use.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import _forksafe
from ._errors import ConfigurationError
from ._password import ConnectTarget
from ._tokens import host_patterns, margin_seconds, refused_host

__all__ = ["SCOPES", "IAMAuth", "server_ca"]

# The scope that Cloud SQL and AlloyDB IAM database authentication accept.
SCOPES = ("https://www.googleapis.com/auth/sqlservice.login",)

_REJECTED_HINT = (
    "The password was a Google OAuth2 access token from safepg.gcp.IAMAuth. Check: the "
    "instance has the flag cloudsql.iam_authentication=on (AlloyDB: "
    "alloydb.iam_authentication); the IAM user or service account was added to the instance "
    "as a database user; the user name is the account's email, without "
    "'.gserviceaccount.com' for a service account; the identity has the Cloud SQL Instance User "
    "(or AlloyDB Database User) role."
)


def _utcnow() -> datetime.datetime:
    # google-auth's expiry is a naive UTC datetime.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _google_error(ex: BaseException) -> bool:
    module = type(ex).__module__ or ""
    return module.startswith("google.auth")


class IAMAuth:
    """A password callable that gives Google IAM access tokens for Cloud SQL and AlloyDB.

    Args:
        credentials: google-auth credentials (with ``token``, ``expiry``, ``valid`` and
            ``refresh(request)``); by default ``google.auth.default(scopes=SCOPES)``, on first
            use.
        request: the google-auth transport request used to refresh; by default
            ``google.auth.transport.requests.Request()``.
        margin: seconds before the token's expiry at which it is refreshed.
        hosts: if given, the only host names the token is sent to: names, addresses, or
            ``*.suffix`` patterns. The token is not bound to one instance (every instance that
            has the identity as a user accepts it), and Cloud SQL hosts are usually addresses,
            so by default any host is allowed; listing yours keeps a mistyped or redirected
            host from ever receiving it.
        clock: the current time as a naive UTC datetime; tests replace it.

    Raises:
        ConfigurationError: a bad *margin* or *hosts*; when called, the host is not in *hosts*,
            google-auth is missing, or no credentials were found, or refreshing them failed.
    """

    rejected_hint = _REJECTED_HINT

    def __init__(
        self,
        credentials: Any = None,
        *,
        request: Any = None,
        margin: float = 300.0,
        hosts: Iterable[str] | None = None,
        clock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.margin = datetime.timedelta(seconds=margin_seconds(margin))
        self.hosts = host_patterns(hosts)
        self._credentials = credentials
        self._request = request
        self._clock = clock
        self._lock = threading.Lock()
        self._own_credentials = credentials is None
        self._own_request = request is None
        _forksafe.reset_in_child(self, IAMAuth._after_fork)

    def _after_fork(self) -> None:
        # In a forked child: a parent's thread may have held the lock, refreshing; what was
        # made here (credentials, the HTTP session of the request) is shared with the parent,
        # so the child makes its own. What the caller gave stays theirs.
        self._lock = threading.Lock()
        if self._own_credentials:
            self._credentials = None
        if self._own_request:
            self._request = None

    def __repr__(self) -> str:
        return f"IAMAuth(credentials={type(self._credentials).__name__})"

    def _load(self) -> None:
        try:
            import google.auth
            import google.auth.transport.requests
        except ImportError:
            raise ConfigurationError(
                "safepg.gcp needs google-auth with requests: pip install 'safepg-tls[gcp]'"
            ) from None
        if self._credentials is None:
            self._credentials, _ = google.auth.default(scopes=list(SCOPES))
        if self._request is None:
            self._request = google.auth.transport.requests.Request()

    def _fresh(self) -> bool:
        creds = self._credentials
        if not creds.token or not creds.valid:
            return False
        return creds.expiry is None or self._clock() < creds.expiry - self.margin

    def __call__(self, target: ConnectTarget, /) -> str:
        """An access token: the credentials' own until their expiry minus the margin, else a
        refreshed one. The same token serves every host (in *hosts*, if given) and user."""
        refused = refused_host(self.hosts, target.all_hosts)
        if refused is not None:
            raise ConfigurationError(
                f"safepg.gcp.IAMAuth did not send a token to {refused!r}: it is not in the "
                f"hosts it was given ({', '.join(self.hosts or ())})."
            )
        with self._lock:
            try:
                if self._credentials is None or self._request is None:
                    self._load()
                if not self._fresh():
                    self._credentials.refresh(self._request)
            except Exception as ex:
                if not _google_error(ex):
                    raise
                first = str(ex).strip().splitlines()[0] if str(ex).strip() else ""
                raise ConfigurationError(
                    f"could not get a Google IAM token ({type(ex).__name__}: {first}). Run "
                    "'gcloud auth application-default login', or set "
                    "GOOGLE_APPLICATION_CREDENTIALS to a service account key, or attach a "
                    "service account to the workload."
                ) from None
            token = self._credentials.token
        if not isinstance(token, str) or not token:
            raise ConfigurationError("the Google credentials gave no access token")
        return token


def server_ca(connection_name: str, *, timeout: float | None = None) -> str:
    """The path of a Cloud SQL instance's server CA, for ``sslrootcert``.

    Fetched from the Cloud SQL Admin API (``connectSettings``) with application default
    credentials, checked (PEM, CA, not expired), written into safepg's private cache and reused
    until it nears expiry::

        conn = safepg.connect(host="<the instance's dnsName>",
                              sslrootcert=safepg.gcp.server_ca("my-project:europe-west1:db"))

    Args:
        connection_name: ``project:region:instance``, as ``gcloud sql instances describe``
            shows it (``connectionName``).
        timeout: seconds for the whole fetch (default 10).

    Raises:
        ConfigurationError: a malformed name, no credentials, the API refused or failed, or
            what it served is not a usable CA.
    """
    from . import _fetch

    parts = connection_name.rsplit(":", 2) if isinstance(connection_name, str) else []
    if len(parts) != 3 or not (
        _fetch._GCP_ID.fullmatch(parts[0])
        and _fetch._GCP_NAME.fullmatch(parts[1])
        and _fetch._GCP_NAME.fullmatch(parts[2])
    ):
        raise ConfigurationError(
            "safepg.gcp.server_ca() takes the instance's connection name, "
            "project:region:instance (gcloud sql instances describe INSTANCE "
            "--format='value(connectionName)')."
        )
    return _fetch.fetch("cloud-sql", instance=connection_name, timeout=timeout).path
