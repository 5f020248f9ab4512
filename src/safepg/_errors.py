"""The exceptions safepg raises.

Every error has one base, `SafePGError`. Errors raised while connecting also subclass
`psycopg.OperationalError`, so an existing ``except psycopg.OperationalError`` clause around
``psycopg.connect`` keeps working when the call becomes ``safepg.connect``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from ._trust import TrustSource

__all__ = [
    "CertificateExpiredError",
    "ConfigurationError",
    "ConnectionSecurityError",
    "HostnameMismatchError",
    "InsecureConnectionError",
    "ProtocolViolationError",
    "SSLNotSupportedError",
    "SafePGError",
    "TokenRejectedError",
    "UntrustedCertificateError",
]


class SafePGError(Exception):
    """Base class of every error safepg raises."""


class ConfigurationError(SafePGError, psycopg.OperationalError):
    """The connection parameters or the environment cannot give a verified session.

    Raised before any network I/O: a Unix-domain socket host, ``hostaddr`` without ``host``, a
    CA file that is missing, empty or not PEM, a conninfo string libpq cannot parse.
    """


class ConnectionSecurityError(SafePGError, psycopg.OperationalError):
    """The server could not be verified, or the session is below safepg's policy.

    Attributes:
        host: the host name libpq verified against, when known.
        port: the port of the failed attempt, when known.
        trust: the trust anchors that were used, when known.
    """

    host: str | None = None
    port: int | None = None
    trust: TrustSource | None = None


class HostnameMismatchError(ConnectionSecurityError):
    """The server's certificate does not name the host that was dialled.

    Attributes:
        certificate_names: the name libpq quoted from the certificate, when it did.
    """

    certificate_names: tuple[str, ...] = ()


class UntrustedCertificateError(ConnectionSecurityError):
    """The server's certificate chain does not verify against the trust anchors."""


class CertificateExpiredError(UntrustedCertificateError):
    """The server's certificate, or one in its chain, has expired or is not yet valid."""


class SSLNotSupportedError(ConnectionSecurityError):
    """The server does not offer TLS at all."""


class ProtocolViolationError(ConnectionSecurityError):
    """The reply to the TLS request broke the protocol, as an attacker on the path might.

    For example an error message sent instead of TLS, or plaintext bytes injected after the
    server agreed to TLS (CVE-2021-23222). Whatever was sent is unauthenticated: safepg shows
    none of it.
    """


class InsecureConnectionError(ConnectionSecurityError):
    """The established session is not encrypted and verified as safepg's policy requires."""


class TokenRejectedError(SafePGError, psycopg.OperationalError):
    """The server refused the password that a password callable gave (a cloud IAM token).

    The message is the server's, followed by what to check (the provider's own advice when it
    has some, such as granting ``rds_iam``). It never includes the token.
    """


# Public: shown as safepg.X (tracebacks, reprs, SQLAlchemy's messages), where it is documented,
# however this module was imported. Pickle finds it there.
SafePGError.__module__ = "safepg"
ConfigurationError.__module__ = "safepg"
ConnectionSecurityError.__module__ = "safepg"
HostnameMismatchError.__module__ = "safepg"
UntrustedCertificateError.__module__ = "safepg"
CertificateExpiredError.__module__ = "safepg"
SSLNotSupportedError.__module__ = "safepg"
ProtocolViolationError.__module__ = "safepg"
InsecureConnectionError.__module__ = "safepg"
TokenRejectedError.__module__ = "safepg"
