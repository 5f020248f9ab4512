"""Real PostgreSQL servers with TLS and throwaway certificates, for testing code that uses safepg.

Needs the ``safepg-tls[testing]`` extra and PostgreSQL's server binaries (see `find_bindir`)::

    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        conn = safepg.connect(server.conninfo())
"""

from ._binaries import KNOWN_RELEASES, BinariesError, server_bindir
from ._certs import CertificateAuthority, IssuedCertificate
from ._server import PostgresServer, ServerNotFoundError, find_bindir, probe_certificate

__all__ = [
    "KNOWN_RELEASES",
    "BinariesError",
    "CertificateAuthority",
    "IssuedCertificate",
    "PostgresServer",
    "ServerNotFoundError",
    "find_bindir",
    "probe_certificate",
    "server_bindir",
]
