"""safepg: PostgreSQL connections that are always encrypted and authenticated.

``safepg.connect(...)`` takes what ``psycopg.connect`` takes and returns a real
``psycopg.Connection``, always with ``sslmode=verify-full`` and the right trust anchors::

    import safepg

    conn = safepg.connect("postgresql://app:secret@mydb.abc123.eu-central-1.rds.amazonaws.com/app")
    print(safepg.check(conn))
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Where each public name is defined. It is imported on first use (PEP 562): `import safepg`,
# and pytest loading the safepg plugin in every run, then cost nothing until safepg is used.
_LOCATIONS = {
    "AsyncPasswordSource": "._password",
    "CertificateExpiredError": "._errors",
    "ConfigurationError": "._errors",
    "ConnectTarget": "._password",
    "ConnectionSecurityError": "._errors",
    "HostnameMismatchError": "._errors",
    "InsecureConnectionError": "._errors",
    "PasswordProvider": "._password",
    "PasswordSource": "._password",
    "ProtocolViolationError": "._errors",
    "SSLNotSupportedError": "._errors",
    "SSLReport": "._check",
    "SafePGError": "._errors",
    "TokenRejectedError": "._errors",
    "TrustSource": "._trust",
    "UntrustedCertificateError": "._errors",
    "check": "._check",
    "check_async": "._check",
    "connect": "._connect",
    "connect_async": "._connect",
    "resolve_trust": "._connect",
    "secure_conninfo": "._connect",
    "ssl_context": "._sslcontext",
}


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if not TYPE_CHECKING:  # for type checkers, the names are the imports above

    def __getattr__(name: str) -> Any:
        where = _LOCATIONS.get(name)
        if where is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(where, __name__), name)
        globals()[name] = value
        return value
