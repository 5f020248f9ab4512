"""safepg: PostgreSQL connections that are always encrypted and authenticated.

``safepg.connect(...)`` takes what ``psycopg.connect`` takes and returns a real
``psycopg.Connection``, always with ``sslmode=verify-full`` and the right trust anchors::

    import safepg

    conn = safepg.connect("postgresql://app:secret@mydb.abc123.eu-central-1.rds.amazonaws.com/app")
    print(safepg.check(conn))
"""

from ._check import SSLReport, check, check_async
from ._connect import connect, connect_async, resolve_trust, secure_conninfo
from ._errors import (
    CertificateExpiredError,
    ConfigurationError,
    ConnectionSecurityError,
    HostnameMismatchError,
    InsecureConnectionError,
    ProtocolViolationError,
    SafePGError,
    SSLNotSupportedError,
    TokenRejectedError,
    UntrustedCertificateError,
)
from ._password import AsyncPasswordSource, ConnectTarget, PasswordProvider, PasswordSource
from ._sslcontext import ssl_context
from ._trust import TrustSource

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncPasswordSource",
    "CertificateExpiredError",
    "ConfigurationError",
    "ConnectTarget",
    "ConnectionSecurityError",
    "HostnameMismatchError",
    "InsecureConnectionError",
    "PasswordProvider",
    "PasswordSource",
    "ProtocolViolationError",
    "SSLNotSupportedError",
    "SSLReport",
    "SafePGError",
    "TokenRejectedError",
    "TrustSource",
    "UntrustedCertificateError",
    "__version__",
    "check",
    "check_async",
    "connect",
    "connect_async",
    "resolve_trust",
    "secure_conninfo",
    "ssl_context",
]

# Public classes are shown as safepg.X (in tracebacks, reprs and SQLAlchemy's messages), where
# they are documented, not under the private module that defines them. Pickle finds them there.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
