"""Choosing the trust anchors (``sslrootcert``) for a connection.

The order, first match wins:

1. the caller's ``sslrootcert`` (conninfo, keyword argument or service file); ``system`` means the
   OS store of step 5, because psycopg-binary's libpq cannot find it and libpq < 16 does not
   know the value;
2. ``PGSSLROOTCERT``;
3. libpq's default file, ``~/.postgresql/root.crt`` (``%APPDATA%\\postgresql\\root.crt`` on
   Windows), if present;
4. a CA set bundled with safepg, chosen by host name (see `safepg.providers`: Amazon RDS,
   GovCloud, Azure, Supabase), or a CA fetched from the provider's API for providers that issue
   one per instance, cluster or project (Google Cloud SQL, DigitalOcean, Aiven: see `_fetch`);
5. the OS trust store, as a PEM file;
6. certifi.

A file the caller named (steps 1-3, ``SSL_CERT_FILE``) that is missing, empty, unreadable or holds
no PEM certificate is an error that names it: safepg never falls back from it to another source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import certifi

from . import _cache, _x509, providers
from ._environ import getenv
from ._errors import ConfigurationError

__all__ = ["TrustOrigin", "TrustSource"]

logger = logging.getLogger("safepg")

TrustOrigin = Literal[
    "sslrootcert",
    "PGSSLROOTCERT",
    "libpq-default",
    "bundled",
    "fetched",
    "os-store",
    "certifi",
    "combined",
]


@dataclass(frozen=True)
class TrustSource:
    """The trust anchors used to verify a server.

    Attributes:
        path: the PEM file handed to libpq as ``sslrootcert``.
        label: where it came from, for people (``"bundled Amazon RDS roots"``).
        origin: where it came from, for programs.
    """

    path: str
    label: str
    origin: TrustOrigin

    def __str__(self) -> str:
        return f"{self.label} ({self.path})"


# Where distributions keep the OS store as one PEM file.
WELL_KNOWN_STORE_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Gentoo, Alpine
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL, CentOS, Fedora
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora (older layout)
    "/etc/ssl/ca-bundle.pem",  # openSUSE, SLES
    "/etc/pki/tls/cacert.pem",  # OpenELEC
    "/etc/ssl/cert.pem",  # macOS, FreeBSD, OpenBSD, Alpine
    "/usr/local/etc/ssl/cert.pem",  # FreeBSD ports
)

# path -> (inode, size, mtime) of a CA file already found to hold a PEM certificate.
_valid_files: dict[str, tuple[int, int, int]] = {}


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    """A file's version on disk: inode, size and modification time (ns)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_key(path: str) -> tuple[int, int, int, int] | None:
    """*path*'s version on disk with its device (None when it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _record_name(path: str) -> str:
    return f"ca-{hashlib.sha256(os.fsencode(path)).hexdigest()[:32]}.json"


def _record(path: str, st: os.stat_result) -> bytes:
    stat_key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return json.dumps({"version": 1, "path": path, "stat": stat_key}).encode()


def _recorded_valid(path: str, st: os.stat_result) -> bool:
    """*path* was found valid by an earlier process, with the same device, inode, size and
    mtime (ns): the record in safepg's private cache directory, if that exists (a process
    that checks a CA file never creates it)."""
    if not os.path.isdir(_cache.cache_location()):
        return False
    directory = _cache.usable()
    if directory is None:
        return False
    try:
        return _cache.read_private_file(directory / _record_name(path)) == _record(path, st)
    except OSError:
        return False


def _record_valid(path: str, st: os.stat_result) -> None:
    if not os.path.isdir(_cache.cache_location()):
        return
    directory = _cache.usable()
    if directory is None:
        return
    try:
        _cache.write_private_file(directory / _record_name(path), _record(path, st))
    except (OSError, ConfigurationError) as ex:
        logger.debug("safepg: cannot record that %s was checked: %s", path, ex)


def record_checked(path: str) -> None:
    """Record on disk that *path* passed `check_ca_file` in this process, as it is now (the
    fast path calls it once it has learned a host with it, when the cache directory exists)."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if _valid_files.get(path) == stat_key(st):
        _record_valid(path, st)


def check_ca_file(path: str, named_by: str) -> None:
    """Check that *path* is a readable, non-empty file holding at least one PEM certificate.

    Once per file version: in this process, by its inode, size and mtime; across processes, by
    its device, inode, size and mtime (ns), recorded in safepg's cache directory.

    Raises:
        ConfigurationError: naming the file and *named_by*, where its name came from.
    """
    problem = None
    try:
        st = os.stat(path)
        if _valid_files.get(path) == stat_key(st):
            return
        if stat.S_ISREG(st.st_mode) and _recorded_valid(path, st):
            _valid_files[path] = stat_key(st)
            return
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_size == 0:
            problem = "is empty"
        else:
            with open(path, "rb") as f:
                problem = _pem_problem(f.read())
    except FileNotFoundError:
        problem = "does not exist"
    except PermissionError:
        problem = "cannot be read (permission denied)"
    except OSError as ex:
        problem = f"cannot be read ({ex.strerror})"
    if problem:
        raise ConfigurationError(
            f"CA file {path!r}, named by {named_by}, {problem}. safepg does not fall back to "
            "other trust anchors when you name a file: fix the path or the file, or remove the "
            "setting to let safepg choose."
        )
    _valid_files[path] = stat_key(st)
    _record_valid(path, st)


def _pem_problem(data: bytes) -> str | None:
    """What keeps OpenSSL from loading *data* as a CA file, read as it reads it, or None."""
    try:
        certs = [cert for _block, cert in _x509.read_certificates(data) if cert is not None]
    except _x509.PemError as ex:
        return f"cannot be read as OpenSSL reads it: {ex}"
    if not certs:
        return "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    return None


def libpq_default_root() -> Path | None:
    """libpq's default root file: ``~/.postgresql/root.crt`` (``%APPDATA%`` on Windows)."""
    if os.name == "nt":
        appdata = os.environ.get("APPDATA")
        return Path(appdata, "postgresql", "root.crt") if appdata else None
    return _default_root_for(getenv("HOME"), os.geteuid())


def libpq_homes() -> tuple[Path, ...]:
    """Every ``~/.postgresql`` a libpq 14-18 may read its default files from: libpq 15 and
    later take ``HOME`` when it is set, libpq 14 always the effective user's home in the
    password database (``%APPDATA%/postgresql`` on Windows)."""
    if os.name == "nt":
        root = libpq_default_root()
        return (root.parent,) if root is not None else ()
    euid = os.geteuid()
    found = [_default_root_for(getenv("HOME"), euid), _default_root_for(None, euid)]
    return tuple(dict.fromkeys(p.parent for p in found if p is not None))


@functools.lru_cache(maxsize=8)
def _default_root_for(home: str | None, euid: int) -> Path | None:
    if not home:
        # libpq falls back to the password database when HOME is unset (the effective
        # user's entry, as libpq's pqGetHomeDirectory reads it); so do we.
        try:
            import pwd

            home = pwd.getpwuid(euid).pw_dir
        except (ImportError, KeyError):
            return None
    return Path(home, ".postgresql", "root.crt")


def _pem_from_dir(directory: str) -> bytes:
    """The certificates of an OS certificate directory as one file for libpq, in canonical PEM.

    Only the CERTIFICATE and X509 CERTIFICATE blocks of files safepg reads as OpenSSL does; a
    certificate that is also in a TRUSTED CERTIFICATE block anywhere (whose trust settings,
    perhaps a distrust, would be lost in a plain copy) is left out, like that block.
    """
    plain: dict[str, _x509.Cert] = {}
    trusted: list[_x509.Cert] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return b""
    for entry in entries:
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as f:
                blocks = _x509.read_pem(f.read())
            found = [
                (b.label == _x509.TRUSTED_LABEL, _x509.certificate(b))
                for b in blocks
                if b.label in _x509.CERTIFICATE_LABELS or b.label == _x509.TRUSTED_LABEL
            ]
        except (OSError, _x509.PemError):
            continue  # not a file OpenSSL loads the way safepg reads it: none of it
        for is_trusted, cert in found:
            if is_trusted:
                trusted.append(cert)
            else:
                plain[cert.sha256] = cert
    fingerprints = {c.sha256 for c in trusted}
    subjects = {c.subject for c in trusted}
    return b"".join(
        plain[fp].pem()
        for fp in sorted(plain)
        if fp not in fingerprints and plain[fp].subject not in subjects
    )


def _windows_store_pem() -> bytes:  # pragma: no cover - Windows only
    import ssl

    certs = {
        ssl.DER_cert_to_PEM_cert(der).encode()
        for store in ("ROOT",)
        for der, encoding, _trust in ssl.enum_certificates(store)  # type: ignore[attr-defined]
        if encoding == "x509_asn"
    }
    return b"".join(sorted(certs))


# (SSL_CERT_FILE, SSL_CERT_DIR) -> the OS store found for them, and whether safepg wrote it.
_os_store_memo: dict[tuple[str | None, str | None], tuple[TrustSource | None, bool]] = {}


def _still_valid(found: TrustSource, ours: bool) -> bool:
    """A memoized source is still usable: a file safepg wrote is unchanged in its private
    directory; anyone else's file still holds a certificate (checked by stat, cheaply)."""
    if ours:
        return _cache.unchanged(found.path)
    try:
        check_ca_file(found.path, "the OS")
    except ConfigurationError:
        return False
    return True


def os_store() -> TrustSource | None:
    """The OS trust store as one PEM file, or None when this machine has none.

    Looks at ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` (OpenSSL's convention), then the paths Python's
    OpenSSL was built with, then the distributions' well-known files, then OpenSSL's certificate
    directory. A directory (and the Windows store) is written once into safepg's cache directory
    as a PEM file, because libpq's ``sslrootcert`` takes a file.

    Raises:
        ConfigurationError: ``SSL_CERT_FILE`` names a bad file.
    """
    env_file = getenv("SSL_CERT_FILE") or None
    env_dir = getenv("SSL_CERT_DIR") or None
    key = (env_file, env_dir)
    memo = _os_store_memo.get(key)
    if memo is not None and memo[0] is not None and _still_valid(memo[0], memo[1]):
        return memo[0]
    found: TrustSource | None
    if env_file:
        check_ca_file(env_file, "the SSL_CERT_FILE environment variable")
        found = TrustSource(env_file, "OS trust store (SSL_CERT_FILE)", "os-store")
    else:
        found = _find_os_store(env_dir)
    _os_store_memo[key] = (found, found is not None and _cache.unchanged(found.path))
    return found


def _dir_source(directory: str, label: str) -> TrustSource | None:
    pem = _pem_from_dir(directory)
    if not pem:
        return None
    path = _cache.write_trust_file("os-store", pem)
    return TrustSource(str(path), label, "os-store")


def _find_os_store(env_dir: str | None) -> TrustSource | None:
    if env_dir:
        found = _dir_source(env_dir, f"OS trust store (SSL_CERT_DIR={env_dir})")
        if found:
            return found
    import ssl  # not at import time: import safepg stays cheap

    defaults = ssl.get_default_verify_paths()
    candidates = [defaults.cafile] if defaults.cafile else []
    candidates += WELL_KNOWN_STORE_FILES
    for path in candidates:
        try:
            check_ca_file(path, "the OS")
        except ConfigurationError:
            continue
        # The path is shown by TrustSource.__str__: not in the label too.
        return TrustSource(path, "OS trust store", "os-store")
    if defaults.capath and os.path.isdir(defaults.capath):
        found = _dir_source(defaults.capath, f"OS trust store ({defaults.capath})")
        if found:
            return found
    if sys.platform == "win32":  # pragma: no cover
        pem = _windows_store_pem()
        if pem:
            path = _cache.write_trust_file("windows-root-store", pem)
            return TrustSource(str(path), "OS trust store (Windows ROOT store)", "os-store")
    return None


# path -> stat key of bundled files already checked for anchors close to expiry.
_expiry_checked: dict[str, tuple[int, int, int]] = {}


def _warn_if_expiring(path: str, label: str) -> None:
    """Warn (once) about anchors of a bundled file expiring within 90 days: every one of them
    may be the anchor a server of that provider relies on."""
    try:
        key = stat_key(os.stat(path))
        if _expiry_checked.get(path) == key:
            return
        with open(path, "rb") as f:
            _x509.warn_if_expiring(_x509.parse_pem(f.read()), label)
    except OSError:
        return
    _expiry_checked[path] = key


def certifi_source() -> TrustSource:
    return TrustSource(certifi.where(), f"certifi {certifi.__version__}", "certifi")


def _fallback() -> TrustSource:
    return os_store() or certifi_source()


def resolve(
    rootcert: str | None,
    named_by: str,
    hosts: Sequence[str],
    *,
    from_env: bool = False,
    timeout: float | None = None,
) -> TrustSource:
    """Pick the trust anchors, as the module docstring describes.

    Args:
        rootcert: ``sslrootcert`` as libpq resolved it (conninfo, service file or environment).
        named_by: where *rootcert* came from, for labels and errors.
        hosts: the host names that will be verified (TCP hosts only).
        from_env: *rootcert* came from ``PGSSLROOTCERT``.
        timeout: connect_timeout, which bounds a fetch from a provider's API.
    """
    if rootcert == "system":
        found = os_store()
        if found is None:
            raise ConfigurationError(
                f"sslrootcert=system (from {named_by}) asks for the OS trust store, but this "
                "machine has none that safepg can find. Install your distribution's "
                "ca-certificates package, or set SSL_CERT_FILE to a PEM bundle."
            )
        logger.debug("safepg: trust anchors: %s, for sslrootcert=system (%s)", found, named_by)
        return TrustSource(found.path, f"{found.label}, for sslrootcert=system", "os-store")
    if rootcert:
        check_ca_file(rootcert, named_by)
        origin: TrustOrigin = "PGSSLROOTCERT" if from_env else "sslrootcert"
        logger.debug("safepg: trust anchors: %s, named by %s", rootcert, named_by)
        return TrustSource(rootcert, f"sslrootcert from {named_by}", origin)
    default_root = libpq_default_root()
    if default_root is not None and os.path.exists(default_root):
        check_ca_file(str(default_root), "libpq's default location")
        logger.debug("safepg: trust anchors: %s, libpq's default file (it exists)", default_root)
        return TrustSource(str(default_root), "libpq default root.crt", "libpq-default")

    sources: dict[str, TrustSource] = {}
    for host in hosts:
        profile = providers.profile_for_host(host)
        if profile is not None and profile.trust == "fetched":
            src = fetched_source(profile.key, host, timeout)
            sources[src.path] = src
            logger.debug("safepg: trust anchors for %s: %s (%s)", host, src, profile.name)
            continue
        if profile is None or profile.bundle is None:
            src = _fallback()
            sources[src.path] = src
            logger.debug(
                "safepg: trust anchors for %s: %s (%s)",
                host,
                src,
                f"{profile.name}: no CA bundled" if profile else "no provider set for this host",
            )
            continue
        for path, override in providers.bundle_paths(profile.bundle):
            label = profile.bundle.label + (" (newer copy, checked)" if override else "")
            sources[path] = TrustSource(path, label, "bundled")
            logger.debug(
                "safepg: trust anchors for %s: %s (%s), %s", host, label, profile.name, path
            )
            _warn_if_expiring(path, label)
    if not sources:
        fallback = _fallback()
        logger.debug("safepg: trust anchors: %s (no host name to choose by)", fallback)
        return fallback
    if len(sources) == 1:
        return next(iter(sources.values()))
    return _union(sorted(sources.values(), key=lambda s: s.path))


def fetched_source(provider: str, host: str, timeout: float | None) -> TrustSource:
    """The CA of *host*'s instance, cached or fetched from its provider's API (see `_fetch`).

    Raises:
        ConfigurationError: it could not be fetched; never a fallback to other anchors.
    """
    from . import _fetch

    found = _fetch.fetch(provider, host=host, timeout=timeout)
    return TrustSource(found.path, found.label, "fetched")


# The sources' (path, inode, size, mtime) -> the union file made from them.
_union_memo: dict[tuple[tuple[str, tuple[int, int, int]], ...], TrustSource] = {}


def _union(sources: Sequence[TrustSource]) -> TrustSource:
    """One file holding all of *sources*, for hosts of one conninfo that need different anchors.

    Made once while the sources are unchanged, not re-read on every connect. If the file itself
    changes on disk (tampering, a partial write), it is checked and rebuilt.
    """
    key = tuple((s.path, stat_key(os.stat(s.path))) for s in sources)
    memo = _union_memo.get(key)
    if memo is not None and _cache.unchanged(memo.path):
        return memo
    # Written from the certificates parsed out of each source, in canonical form: libpq gets
    # exactly what safepg read, whatever else the sources hold.
    certs: dict[str, _x509.Cert] = {}
    for source in sources:
        parsed = _x509.parse_pem(Path(source.path).read_bytes())
        if not parsed:
            raise ConfigurationError(
                f"the hosts of this connection need several trust files, and safepg cannot "
                f"combine {source}: it holds no plain PEM certificate safepg can re-encode (or "
                "blocks OpenSSL would read otherwise). Pass one CA file that covers every host "
                "as sslrootcert."
            )
        certs.update((c.sha256, c) for c in parsed)
    path = _cache.write_trust_file("combined", b"".join(c.pem() for c in certs.values()))
    labels = list(dict.fromkeys(s.label for s in sources))
    origins = {s.origin for s in sources}
    if len(labels) == 1 and len(origins) == 1:  # one bundle of several files (Supabase)
        found = TrustSource(str(path), labels[0], origins.pop())
    else:
        found = TrustSource(str(path), "combined: " + " + ".join(labels), "combined")
    _union_memo[key] = found
    return found


# Public: shown as safepg.X (tracebacks, reprs, SQLAlchemy's messages), where it is documented,
# however this module was imported. Pickle finds it there.
TrustSource.__module__ = "safepg"
