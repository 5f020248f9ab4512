"""Managed PostgreSQL services: which trust anchors each needs, and what to do when they fail.

Each `Profile` has host-name patterns, a trust source and advice for errors::

    >>> import safepg.providers
    >>> safepg.providers.profile_for_host("mydb.abc123.eu-west-1.rds.amazonaws.com").name
    'Amazon RDS / Aurora'
    >>> [p.key for p in safepg.providers.PROFILES]
    ['rds-proxy', 'rds-govcloud', 'rds', 'rds-china', 'azure', 'supabase', 'neon', 'cloud-sql',
     'digitalocean', 'aiven', 'crunchy-bridge']

Patterns match whole DNS labels: ``*.rds.amazonaws.com`` matches
``db.x.us-east-1.rds.amazonaws.com`` but neither ``x-rds.amazonaws.com`` nor
``rds.amazonaws.com.evil.example``. A profile only picks trust anchors and advice; libpq still
verifies the certificate against the host name dialled.

Shipped CA files live in ``safepg/cacerts/`` with ``PROVENANCE.md`` beside them. A newer copy of
a shipped file can be put in the bundle override directory (see `override_dir`); it is used only
if it passes the same checks as the shipped data (``safepg bundles check``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "PROFILES",
    "Bundle",
    "Profile",
    "TrustKind",
    "aws_region",
    "bundle_paths",
    "override_dir",
    "profile_for_host",
]

TrustKind = Literal["bundled", "fetched", "os-store", "not-bundled"]


@dataclass(frozen=True)
class Bundle:
    """CA files shipped with safepg, used together."""

    key: str
    files: tuple[str, ...]
    label: str


RDS = Bundle("rds", ("rds-global-bundle.pem",), "bundled Amazon RDS roots")
# GovCloud: the roots only. The GovCloud intermediates AWS publishes expire in 2027, and a
# server sends its own intermediate anyway.
RDS_GOVCLOUD = Bundle(
    "rds-govcloud", ("rds-govcloud-roots.pem",), "bundled Amazon RDS GovCloud roots"
)
AZURE = Bundle(
    "azure", ("azure-postgres-roots.pem",), "bundled Azure Database for PostgreSQL roots"
)
# Supabase's own CLI trusts both roots (same name, different keys).
SUPABASE = Bundle(
    "supabase", ("supabase-root-2021.pem", "supabase-prod-ca-2025.pem"), "bundled Supabase roots"
)
BUNDLES = (RDS, RDS_GOVCLOUD, AZURE, SUPABASE)


def _name(host: str) -> str:
    # Case folding and one trailing dot only choose the profile; libpq verifies the host as given.
    return host.lower().removesuffix(".")


def _under(host: str, *suffixes: str) -> bool:
    """*host* is a name strictly below one of *suffixes* (whole labels)."""
    name = _name(host)
    return any(name.endswith("." + s) for s in suffixes)


def _labels_before(host: str, suffix: str) -> list[str]:
    return _name(host)[: -len(suffix) - 1].split(".")


def _rds_region(host: str) -> str:
    return _labels_before(host, "rds.amazonaws.com")[-1]


def aws_region(host: str) -> str | None:
    """The AWS region in an RDS, Aurora or RDS Proxy endpoint name, or None for other hosts.

    ``db.abc123.eu-central-1.rds.amazonaws.com`` gives ``eu-central-1``; the China regions'
    ``*.rds.cn-north-1.amazonaws.com.cn`` give theirs.
    """
    if _under(host, "rds.amazonaws.com"):
        return _rds_region(host) or None
    if _under(host, "amazonaws.com.cn"):
        labels = _labels_before(host, "amazonaws.com.cn")
        return labels[-1] if labels[-1].startswith("cn-") else None
    return None


def _china_region(host: str) -> str:
    labels = _labels_before(host, "amazonaws.com.cn")
    return labels[-1] if labels and labels[-1].startswith("cn-") else "cn-north-1"


_HOW_TO_USE = (
    "Pass the file as sslrootcert=/path/to/file.pem (or set PGSSLROOTCERT); try it first with "
    "safepg check 'postgresql://USER@HOST/DB?sslrootcert=/path/to/file.pem'."
)


@dataclass(frozen=True)
class Profile:
    """A managed PostgreSQL service.

    Attributes:
        key: a short, stable identifier (``"rds"``).
        name: for people (``"Amazon RDS / Aurora"``).
        patterns: the host names it covers, as glob patterns for people.
        trust: ``"bundled"`` (safepg ships the roots), ``"fetched"`` (a CA per instance,
            cluster or project, fetched from the provider's API with its standard credentials),
            ``"os-store"`` (public CAs: the OS store, then certifi) or ``"not-bundled"``
            (per-cluster CAs with no API to fetch them: you must pass the CA file).
        bundle: the shipped files, for ``"bundled"``.
        notes: what to know about the service.
    """

    key: str
    name: str
    patterns: tuple[str, ...]
    trust: TrustKind
    bundle: Bundle | None
    notes: str
    _match: Callable[[str], bool] = field(repr=False, compare=False)
    _untrusted: Callable[[str], str] = field(repr=False, compare=False)
    _mismatch: Callable[[str], str] | None = field(default=None, repr=False, compare=False)

    def matches(self, host: str) -> bool:
        return self._match(host)

    def untrusted_hint(self, host: str) -> str:
        """What to do when a server of this service does not verify against the trust used."""
        return f"{self.name}: {self._untrusted(host)}"

    def mismatch_hint(self, host: str) -> str | None:
        """What to do when the certificate does not name the host, if it is service-specific."""
        return f"{self.name}: {self._mismatch(host)}" if self._mismatch else None


def _rds_untrusted(host: str) -> str:
    region = _rds_region(host)
    return (
        "safepg checks RDS servers against the Amazon RDS roots it ships (see "
        "safepg/cacerts/PROVENANCE.md for their date and the regions they cover). If your "
        f"region ({region}) or CA is newer than that, download AWS's bundle for it, "
        f"https://truststore.pki.rds.amazonaws.com/{region}/{region}-bundle.pem (or the global "
        f"bundle, https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem). {_HOW_TO_USE}"
    )


def _govcloud_untrusted(host: str) -> str:
    region = _rds_region(host)
    return (
        "safepg checks GovCloud servers against the GovCloud roots it ships. If this fails, "
        f"download https://truststore.pki.{region}.rds.amazonaws.com/{region}/{region}-bundle.pem "
        f"from AWS. {_HOW_TO_USE}"
    )


def _china_untrusted(host: str) -> str:
    region = _china_region(host)
    return (
        "AWS's China regions (cn-north-1 Beijing, cn-northwest-1 Ningxia) use their own RDS "
        "roots, which safepg does not ship: no verifiable public copy was available. Download "
        f"the {region} certificate bundle ({region}-bundle.pem) from 'Certificate bundles for "
        "specific Regions' on https://docs.amazonaws.cn/en_us/AmazonRDS/latest/UserGuide/"
        f"UsingWithRDS.SSL.html, over HTTPS. {_HOW_TO_USE}"
    )


def _per_cluster(where: str) -> Callable[[str], str]:
    def hint(host: str) -> str:
        return (
            "each cluster has its own CA, which no OS store holds. Download it "
            f"({where}) and pass it as sslrootcert=/path/to/ca.pem (or PGSSLROOTCERT)."
        )

    return hint


def _fetched(api: str, cli: str) -> Callable[[str], str]:
    def hint(host: str) -> str:
        return (
            f"its CA is fetched from {api} (safepg fetches it once more when a server stops "
            "verifying, after a rotation). If the server still does not verify, it presents a "
            f"certificate that CA did not issue: compare with {cli}, which can also be passed "
            "as sslrootcert=ca.pem."
        )

    return hint


def _public(service: str) -> Callable[[str], str]:
    def hint(host: str) -> str:
        return (
            f"{service} servers present certificates from public CAs, which the OS trust store "  # noqa: S608
            "or certifi must hold. Update your ca-certificates package or certifi, or set "
            "SSL_CERT_FILE to a current bundle. If this keeps failing, something may be "
            "intercepting the connection."
        )

    return hint


def _cloud_sql_mismatch(host: str) -> str:
    return (
        "verify-full needs the instance's DNS name in the server certificate. Instances with "
        "the legacy per-instance CA (serverCaMode GOOGLE_MANAGED_INTERNAL_CA) have certificates "
        'that hold only a "project:instance" common name, which no host name can match. Move '
        "the instance to a CAS-based server CA (GOOGLE_MANAGED_CAS_CA or CUSTOMER_MANAGED_CAS_CA) "
        "and connect to the dnsName that 'gcloud sql instances describe INSTANCE' shows, or use "
        "the Cloud SQL Auth Proxy or Python connector, which authenticate the instance another way."
    )


def _is_rds(host: str) -> bool:
    return _under(host, "rds.amazonaws.com")


# RDS Proxy endpoints: <proxy>.proxy-<id>.<region>.rds.amazonaws.com, and for extra endpoints
# <endpoint>.endpoint.proxy-<id>.<region>.rds.amazonaws.com. An instance may be named
# "proxy-orders" (proxy-orders.<id>.<region>.rds...), which is no proxy: only the label right
# before the region counts.
_PROXY_ID = re.compile(r"proxy-[a-z0-9]+")


def _is_rds_proxy(host: str) -> bool:
    if not _is_rds(host):
        return False
    labels = _labels_before(host, "rds.amazonaws.com")
    if len(labels) == 4 and labels[1] != "endpoint":
        return False
    return len(labels) in (3, 4) and bool(labels[0]) and bool(_PROXY_ID.fullmatch(labels[-2]))


def _is_govcloud(host: str) -> bool:
    return _is_rds(host) and _rds_region(host).startswith("us-gov-")


PROFILES: tuple[Profile, ...] = (
    Profile(
        "rds-proxy",
        "Amazon RDS Proxy",
        ("*.proxy-*.*.rds.amazonaws.com",),
        "os-store",
        None,
        "Proxies present ACM certificates from Amazon Trust Services' public roots (Amazon Root "
        "CA 1-4, Starfield Services Root CA G2), not the RDS roots.",
        _is_rds_proxy,
        _public("RDS Proxy"),
    ),
    Profile(
        "rds-govcloud",
        "Amazon RDS, GovCloud (US)",
        ("*.us-gov-*.rds.amazonaws.com",),
        "bundled",
        RDS_GOVCLOUD,
        "Roots only: the GovCloud intermediates AWS publishes expire in 2027, and servers send "
        "their own.",
        _is_govcloud,
        _govcloud_untrusted,
    ),
    Profile(
        "rds",
        "Amazon RDS / Aurora",
        ("*.rds.amazonaws.com",),
        "bundled",
        RDS,
        "The global bundle: each region's RSA2048, RSA4096 and ECC384 G1 roots.",
        _is_rds,
        _rds_untrusted,
    ),
    Profile(
        "rds-china",
        "Amazon RDS, China regions",
        ("*.amazonaws.com.cn",),
        "not-bundled",
        None,
        "Not shipped: no verifiable public copy of the China RDS roots was available.",
        lambda host: _under(host, "amazonaws.com.cn"),
        _china_untrusted,
    ),
    Profile(
        "azure",
        "Azure Database for PostgreSQL",
        ("*.postgres.database.azure.com", "*.postgres.database.chinacloudapi.cn"),
        "bundled",
        AZURE,
        "DigiCert Global Root G2, Microsoft RSA Root CA 2017 and DigiCert Global Root CA. The "
        "last one left certifi in 2026.04 but is still used in some regions (China).",
        lambda host: _under(
            host, "postgres.database.azure.com", "postgres.database.chinacloudapi.cn"
        ),
        lambda host: (
            "safepg checks Azure servers against the roots Microsoft documents (DigiCert Global "
            "Root G2, Microsoft RSA Root CA 2017, DigiCert Global Root CA). If your server "
            "chains to another root, download it as Microsoft's TLS documentation for Azure "
            f"Database for PostgreSQL describes. {_HOW_TO_USE}"
        ),
    ),
    Profile(
        "supabase",
        "Supabase",
        ("*.supabase.co", "*.pooler.supabase.com"),
        "bundled",
        SUPABASE,
        "Supabase Root 2021 CA, in both keys Supabase's own CLI trusts.",
        lambda host: _under(host, "supabase.co", "pooler.supabase.com"),
        lambda host: (
            "safepg checks Supabase servers against the Supabase roots it ships. If this "
            "fails, download your project's CA from the dashboard (Project Settings, Database, "
            f"SSL Configuration). {_HOW_TO_USE}"
        ),
    ),
    Profile(
        "neon",
        "Neon",
        ("*.neon.tech",),
        "os-store",
        None,
        "Public CAs.",
        lambda host: _under(host, "neon.tech"),
        _public("Neon"),
    ),
    Profile(
        "cloud-sql",
        "Google Cloud SQL",
        ("*.sql.goog",),
        "fetched",
        None,
        "Per-instance or CAS-based server CAs, fetched from the Cloud SQL Admin API with "
        "application default credentials (GOOGLE_CLOUD_PROJECT names the project). "
        "verify-full needs the instance's DNS name in the certificate, which legacy "
        "per-instance certificates lack.",
        lambda host: _under(host, "sql.goog"),
        lambda host: (
            "each instance has its own server CA, which safepg fetched from the Cloud SQL Admin "
            "API; a rotated CA is fetched once more. If the instance's CA was rotated again, "
            "or the server presents a certificate from another CA, check with 'gcloud sql "
            'instances describe INSTANCE --format="value(serverCaMode,serverCaCert.cert)"\' '
            "(a CA downloaded that way can be passed as sslrootcert=server-ca.pem)."
        ),
        _cloud_sql_mismatch,
    ),
    Profile(
        "digitalocean",
        "DigitalOcean Managed Databases",
        ("*.db.ondigitalocean.com",),
        "fetched",
        None,
        "A CA per cluster, fetched from the DigitalOcean API with DIGITALOCEAN_TOKEN.",
        lambda host: _under(host, "db.ondigitalocean.com"),
        _fetched("the DigitalOcean API", "'doctl databases get-ca CLUSTER_ID'"),
    ),
    Profile(
        "aiven",
        "Aiven for PostgreSQL",
        ("*.aivencloud.com",),
        "fetched",
        None,
        "A CA per project, fetched from the Aiven API with AIVEN_TOKEN.",
        lambda host: _under(host, "aivencloud.com"),
        _fetched("the Aiven API", "'avn project ca-get --project PROJECT'"),
    ),
    Profile(
        "crunchy-bridge",
        "Crunchy Bridge",
        ("*.db.postgresbridge.com",),
        "not-bundled",
        None,
        "A CA per cluster.",
        lambda host: _under(host, "db.postgresbridge.com"),
        _per_cluster("dashboard: the cluster's Connection page"),
    ),
)


def profile_for_host(host: str) -> Profile | None:
    """The profile whose patterns cover *host*, or None. The first match in `PROFILES` wins."""
    for profile in PROFILES:
        if profile.matches(host):
            return profile
    return None


# -- where the files are -----------------------------------------------------------------------

_files = contextlib.ExitStack()
atexit.register(_files.close)
_paths: dict[str, str] = {}


def shipped_path(filename: str) -> str:
    """A real filesystem path for a shipped CA file (extracted once if safepg is zipped)."""
    try:
        return _paths[filename]
    except KeyError:
        pass
    resource = importlib.resources.files("safepg") / "cacerts" / filename
    path: Path = _files.enter_context(importlib.resources.as_file(resource))
    _paths[filename] = str(path)
    return _paths[filename]


def override_dir() -> Path:
    """Where newer copies of shipped CA files may be put: ``SAFEPG_BUNDLE_DIR``, else
    ``bundles/`` in safepg's cache directory. ``safepg bundles install`` writes there."""
    explicit = os.environ.get("SAFEPG_BUNDLE_DIR")
    if explicit:
        return Path(explicit)
    from ._cache import cache_location

    return cache_location() / "bundles"


def bundle_paths(bundle: Bundle) -> list[tuple[str, bool]]:
    """The files to use for *bundle*: (path, is_override) for each of its files.

    A file in `override_dir` with a shipped file's name replaces it, if it passes the checks
    (all CA certificates, signatures that verify, none expired). One that fails them is an
    error, never silently skipped.
    """
    found = []
    directory = override_dir()
    for name in bundle.files:
        candidate = directory / name
        if candidate.is_file():
            from ._bundles import checked_override

            found.append((checked_override(str(candidate)), True))
        else:
            found.append((shipped_path(name), False))
    return found
