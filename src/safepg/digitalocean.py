"""DigitalOcean Managed Databases: a cluster's CA, fetched from the DigitalOcean API.

`safepg.connect` fetches it by itself for a ``*.db.ondigitalocean.com`` host when no CA file is
named, with the token in ``DIGITALOCEAN_TOKEN`` (or ``DIGITALOCEAN_ACCESS_TOKEN``). `cluster_ca`
does it for a cluster named by its id::

    conn = safepg.connect(host="db-...ondigitalocean.com", port=25060,
                          sslrootcert=safepg.digitalocean.cluster_ca("9cc10173-..."))
"""

from __future__ import annotations

from ._errors import ConfigurationError

__all__ = ["cluster_ca"]


def cluster_ca(cluster_id: str, *, timeout: float | None = None) -> str:
    """The path of a database cluster's CA, for ``sslrootcert``.

    Fetched from ``GET /v2/databases/{id}/ca`` with ``DIGITALOCEAN_TOKEN``, checked (PEM, CA,
    not expired), written into safepg's private cache and reused until it nears expiry.

    Args:
        cluster_id: the cluster's id, a UUID (``doctl databases list``).
        timeout: seconds for the whole fetch (default 10).

    Raises:
        ConfigurationError: not a cluster id, no token, the API refused or failed, or what it
            served is not a usable CA.
    """
    from . import _fetch

    if not isinstance(cluster_id, str) or not _fetch._DO_UUID.fullmatch(cluster_id):
        raise ConfigurationError(
            "safepg.digitalocean.cluster_ca() takes a DigitalOcean cluster id, a UUID such "
            "as 9cc10173-e9ea-4176-9dbc-a4cee4c4ff30 (doctl databases list); that is not a "
            "DigitalOcean cluster id."
        )
    return _fetch.fetch("digitalocean", instance=cluster_id, timeout=timeout).path
