"""Aiven for PostgreSQL: a project's CA, fetched from the Aiven API.

`safepg.connect` fetches it by itself for a ``*.aivencloud.com`` host when no CA file is named,
with the token in ``AIVEN_TOKEN``; the project is found from the service host name
(``<service>-<project>.<zones>.aivencloud.com``). `project_ca` does it for a project named::

    conn = safepg.connect(host="pg-main-acme-prod.a.aivencloud.com", port=12691,
                          sslrootcert=safepg.aiven.project_ca("acme-prod"))
"""

from __future__ import annotations

from ._errors import ConfigurationError

__all__ = ["project_ca"]


def project_ca(project: str, *, timeout: float | None = None) -> str:
    """The path of an Aiven project's CA, for ``sslrootcert``.

    Fetched from ``GET /v1/project/{project}/kms/ca`` with ``AIVEN_TOKEN``, checked (PEM, CA,
    not expired), written into safepg's private cache and reused until it nears expiry.

    Args:
        project: the Aiven project's name (``avn project list``).
        timeout: seconds for the whole fetch (default 10).

    Raises:
        ConfigurationError: not a project name, no token, the API refused or failed, or what
            it served is not a usable CA.
    """
    from . import _fetch

    if not isinstance(project, str) or not _fetch._AIVEN_NAME.fullmatch(project):
        raise ConfigurationError(
            "safepg.aiven.project_ca() takes an Aiven project name: lowercase letters, digits "
            "and hyphens (avn project list)."
        )
    return _fetch.fetch("aiven", instance=project, timeout=timeout).path
