"""Microsoft Entra ID tokens as passwords for Azure Database for PostgreSQL
(``safepg-tls[azure]``).

::

    import safepg, safepg.azure

    conn = safepg.connect(
        host="myserver.postgres.database.azure.com", user="app@contoso.com", dbname="app",
        password=safepg.azure.EntraAuth(),
    )

`EntraAuth` asks azure-identity's ``DefaultAzureCredential`` (or the credential you pass) for
a token for Azure Database for PostgreSQL, and reuses it until its expiry minus *margin*.
azure-identity is imported on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _forksafe
from ._errors import ConfigurationError
from ._password import ConnectTarget
from ._tokens import TokenCache, host_patterns, margin_seconds, refused_host

__all__ = ["AZURE_HOSTS", "SCOPE", "EntraAuth"]

# Azure Database for PostgreSQL's own names: an Entra token goes only there unless told.
AZURE_HOSTS = (
    "*.postgres.database.azure.com",
    "*.postgres.database.usgovcloudapi.net",
    "*.postgres.database.chinacloudapi.cn",
)

# The scope of Azure Database for PostgreSQL (flexible server) tokens.
SCOPE = "https://ossrdbms-aad.database.windows.net/.default"

_REJECTED_HINT = (
    "The password was a Microsoft Entra ID token from safepg.azure.EntraAuth. Check: the user "
    "name is the Entra principal's name as created on the server (pgaadauth_create_principal, "
    "or the server's Entra administrator); Entra authentication is enabled on the server; the "
    "token is for the identity you expect ('az account get-access-token --resource-type "
    "oss-rdbms' shows it)."
)


def _is_auth_error(ex: BaseException) -> bool:
    # azure-core's ClientAuthenticationError (CredentialUnavailableError is one), matched by
    # name so that an injected credential needs no azure package.
    return any(c.__name__ == "ClientAuthenticationError" for c in type(ex).__mro__)


class EntraAuth:
    """A password callable that gives Microsoft Entra ID access tokens.

    Args:
        credential: an azure-identity credential (anything with ``get_token(scope)`` returning
            an object with ``token`` and ``expires_on``, epoch seconds); by default a
            ``DefaultAzureCredential()``, made on first use.
        margin: seconds before the token's expiry at which it is no longer reused.
        hosts: the host names the token may be sent to: names, addresses, or ``*.suffix``
            patterns. An Entra token is not bound to one server: every Azure Database for
            PostgreSQL server that trusts the identity accepts it, so a server elsewhere that
            got it could replay it. By default only Azure's own names (`AZURE_HOSTS`); list
            your server's custom DNS name or private address here to use it.
        clock: the current time in epoch seconds (``time.time``); tests replace it.

    Raises:
        ConfigurationError: a bad *margin* or *hosts*; when called, the host is not in *hosts*,
            or azure-identity is missing or finds no credential.
    """

    rejected_hint = _REJECTED_HINT

    def __init__(
        self,
        credential: Any = None,
        *,
        margin: float = 300.0,
        hosts: Iterable[str] | None = AZURE_HOSTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.margin = margin_seconds(margin)
        self.hosts = host_patterns(hosts)
        self._credential = credential
        self._clock = clock
        self._cache = TokenCache(clock)
        self._lock = threading.Lock()
        self._own_credential = credential is None
        _forksafe.reset_in_child(self, EntraAuth._after_fork)

    def _after_fork(self) -> None:
        # In a forked child: a parent's thread may have held the lock, and a credential made
        # here (its HTTP sessions, its own locks) is shared with the parent: the child makes
        # its own. A credential the caller gave stays theirs.
        self._lock = threading.Lock()
        if self._own_credential:
            self._credential = None

    def __repr__(self) -> str:
        return f"EntraAuth(credential={type(self._credential).__name__})"

    def _get_credential(self) -> Any:
        with self._lock:
            if self._credential is None:
                try:
                    from azure.identity import DefaultAzureCredential
                except ImportError:
                    raise ConfigurationError(
                        "safepg.azure needs azure-identity: pip install 'safepg-tls[azure]'"
                    ) from None
                self._credential = DefaultAzureCredential()
            return self._credential

    def _fetch(self) -> tuple[str, float]:
        try:
            access = self._get_credential().get_token(SCOPE)
        except Exception as ex:
            if not _is_auth_error(ex):
                raise
            first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            raise ConfigurationError(
                f"could not get a Microsoft Entra ID token: {first}. Sign in with 'az login', "
                "or set up a managed identity or the AZURE_CLIENT_ID/AZURE_TENANT_ID/"
                "AZURE_CLIENT_SECRET environment variables (see DefaultAzureCredential)."
            ) from None
        return _checked_token(access.token), float(access.expires_on) - self.margin

    def __call__(self, target: ConnectTarget, /) -> str:
        """A token for Azure Database for PostgreSQL: a cached one until its expiry minus
        the margin, else a new one. The same token serves every host in *hosts* and user."""
        refused = refused_host(self.hosts, target.all_hosts)
        if refused is not None:
            raise ConfigurationError(
                f"safepg.azure.EntraAuth did not send a token to {refused!r}: it is not an "
                "Azure Database for PostgreSQL name (with several hosts, libpq may send the "
                "password to each), and an Entra token is accepted by every "
                "server that trusts the identity, so another server could replay it. If this "
                f"is your server (a custom DNS name or private endpoint), pass "
                f"EntraAuth(hosts=[{refused!r}])."
            )
        return self._cache.get(SCOPE, self._fetch)


def _checked_token(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise ConfigurationError("the Azure credential returned no token")
    return token
