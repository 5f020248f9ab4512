"""Cloud providers whose servers chain to private roots that safepg ships.

The files live in ``safepg/cacerts/`` with ``PROVENANCE.md`` beside them, which records where each
came from and the SHA-256 of every certificate (a test checks the files against it).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Bundle", "bundle_for_host", "bundled_path"]


@dataclass(frozen=True)
class Bundle:
    """A CA file shipped with safepg."""

    filename: str
    label: str


RDS = Bundle("rds-global-bundle.pem", "bundled Amazon RDS roots")
# GovCloud: the roots only. The GovCloud intermediates AWS publishes expire in 2027, and a
# server sends its own intermediate anyway.
RDS_GOVCLOUD = Bundle("rds-govcloud-roots.pem", "bundled Amazon RDS GovCloud roots")

ALL_BUNDLES = (RDS, RDS_GOVCLOUD)

_RDS_SUFFIX = ".rds.amazonaws.com"


def is_rds_host(host: str) -> bool:
    """An Amazon RDS, Aurora or RDS Proxy endpoint name."""
    return host.lower().removesuffix(".").endswith(_RDS_SUFFIX)


def bundle_for_host(host: str) -> Bundle | None:
    """The bundled CA file for servers named *host*, or None when none applies.

    RDS and Aurora endpoints (``*.rds.amazonaws.com``) get the RDS roots; ``us-gov-*`` regions get
    the GovCloud roots. RDS Proxy endpoints (a ``proxy-`` label) present certificates from Amazon's
    public roots instead, so they get no bundle and fall through to the OS store and certifi.
    """
    # Case folding only chooses the file; libpq still gets (and verifies) the host as given.
    if not is_rds_host(host):
        return None
    name = host.lower().removesuffix(".")
    labels = name[: -len(_RDS_SUFFIX)].split(".")
    if any(label.startswith("proxy-") for label in labels):
        return None
    if labels[-1].startswith("us-gov-"):
        return RDS_GOVCLOUD
    return RDS


_files = contextlib.ExitStack()
atexit.register(_files.close)
_paths: dict[str, str] = {}


def bundled_path(filename: str) -> str:
    """A real filesystem path for a shipped CA file (extracted once if safepg is zipped)."""
    try:
        return _paths[filename]
    except KeyError:
        pass
    resource = importlib.resources.files("safepg") / "cacerts" / filename
    path: Path = _files.enter_context(importlib.resources.as_file(resource))
    _paths[filename] = str(path)
    return _paths[filename]
