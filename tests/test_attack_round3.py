"""Attack round 3: holes found in the option policy, contexts and asyncpg paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from psycopg import pq

import safepg
from safepg import ConfigurationError
from safepg.testing import CertificateAuthority, PostgresServer

from .test_driver_policy import write_crl

pytest.importorskip("asyncpg")
import safepg.asyncpg


def _fetch(dsn: str, **kwargs: Any) -> Any:
    async def go() -> Any:
        conn = await safepg.asyncpg.connect(dsn, **kwargs)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    return asyncio.run(go())


def test_a_dsn_crl_is_not_dropped_beside_a_context_that_checks_other_crls(
    server: PostgresServer, tmp_path: Path
) -> None:
    # Your context checks CRLs, but not the ones the DSN names: the DSN's revocation of the
    # server's certificate must not be dropped.
    other = server.ca.issue("other.example.com")
    harmless = write_crl(tmp_path / "other.crl", server.ca, other.cert)
    ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path, sslcrl=harmless)
    revoked = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    url = server.url() + "&sslcrl=" + quote(str(revoked), safe="")
    with pytest.raises((ConfigurationError, safepg.UntrustedCertificateError)):
        _fetch(url, ssl=ctx)


def _subject_hash(ca: CertificateAuthority) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash"],
        input=ca.cert_pem,
        capture_output=True,
        check=True,
    )
    return out.stdout.decode().strip()


def _rogue_crl_dir(path: Path, server: PostgresServer, rogue_ca: CertificateAuthority) -> Path:
    """A directory as c_rehash makes it: the rogue CA's certificate (which OpenSSL's directory
    lookup trusts), and a CRL of each CA (libpq checks the whole chain)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command for certificate hashes")
    path.mkdir()
    (path / f"{_subject_hash(rogue_ca)}.0").write_bytes(rogue_ca.cert_pem)
    write_crl(path / f"{_subject_hash(rogue_ca)}.r0", rogue_ca)
    write_crl(path / f"{_subject_hash(server.ca)}.r0", server.ca)
    return path


@pytest.mark.parametrize("clean_first", [True, False])
def test_a_crl_directory_list_is_checked_entry_by_entry(
    server: PostgresServer,
    certs: Any,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_first: bool,
) -> None:
    # OpenSSL's directory lookup takes a list of directories separated by ':' (libpq hands it
    # sslcrldir as it is): each one's certificates are trust anchors.
    certs.present("localhost", ca=rogue_ca, ip_addresses=["127.0.0.1"])
    rogue = _rogue_crl_dir(tmp_path / "rogue", server, rogue_ca)
    clean = tmp_path / "clean"
    clean.mkdir()
    write_crl(clean / f"{_subject_hash(server.ca)}.r0", server.ca)
    dirs = [str(clean), str(rogue)] if clean_first else [str(tmp_path / "missing"), str(rogue)]
    monkeypatch.setenv("PGSSLCRLDIR", os.pathsep.join(dirs))
    with pytest.raises(ConfigurationError, match=r"\.0, which OpenSSL"):
        safepg.connect(server.url()).close()


def test_a_crl_directory_that_cannot_be_listed_is_refused(
    rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    # OpenSSL opens <hash>.0 by name: a directory it may search (x) but not list (no r) still
    # gives it the certificate, so one safepg cannot list is refused, not taken as clean.
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command for certificate hashes")
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    (rogue / f"{_subject_hash(rogue_ca)}.0").write_bytes(rogue_ca.cert_pem)
    rogue.chmod(0o311)
    try:
        try:
            os.listdir(rogue)
        except PermissionError:
            with pytest.raises(ConfigurationError, match=r"cannot be listed \(Permission denied\)"):
                safepg.secure_conninfo("host=db.example.com", sslcrldir=str(rogue))
            return
        # Root lists every directory: the check runs in a child without the capabilities that
        # let it (as a root service confined by systemd's CapabilityBoundingSet would be).
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("this process lists every directory, and setpriv cannot drop that")
        code = (
            "import os, sys, safepg\n"
            "try:\n    os.listdir(sys.argv[1])\nexcept PermissionError:\n    pass\n"
            "else:\n    print('listed')\n    sys.exit()\n"
            "try:\n    safepg.secure_conninfo('host=db.example.com', sslcrldir=sys.argv[1])\n"
            "except safepg.ConfigurationError as ex:\n"
            "    print('refused', 'cannot be listed (Permission denied)' in str(ex))\n"
            "else:\n    print('accepted')\n"
        )
        proc = subprocess.run(
            [
                *("setpriv", "--bounding-set=-dac_override,-dac_read_search"),
                *(sys.executable, "-c", code, str(rogue)),
            ],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.stdout.strip() == "listed" or "setpriv:" in proc.stderr:
            pytest.skip(f"cannot drop root's directory access here: {proc.stderr.strip()[:200]}")
        assert proc.stdout.strip() == "refused True", proc.stderr[-2000:]
    finally:
        rogue.chmod(0o755)


def test_the_default_crl_is_not_dropped_beside_your_own_context(
    server: PostgresServer, tmp_path: Path, clean_env: Path
) -> None:
    # libpq checks ~/.postgresql/root.crl when sslcrl is not set; your context does not.
    (clean_env / ".postgresql").mkdir()
    write_crl(clean_env / ".postgresql" / "root.crl", server.ca, server.server_cert.cert)
    ctx = ssl.create_default_context(cafile=str(server.ca_path))
    with pytest.raises(ConfigurationError, match=r"root\.crl exists"):
        _fetch(server.url(), ssl=ctx)
    # safepg.ssl_context loads it: the revoked server is refused by the handshake.
    ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path)
    with pytest.raises(safepg.UntrustedCertificateError, match="revoked"):
        _fetch(server.url(), ssl=ctx)


def test_a_context_whose_crl_check_was_turned_off_is_refused_beside_sslcrl(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    monkeypatch.setenv("PGSSLCRL", str(revoked))
    ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path)
    ctx.verify_flags &= ~ssl.VERIFY_CRL_CHECK_CHAIN
    with pytest.raises(ConfigurationError, match=r"sslcrl is set .* beside your own"):
        _fetch(server.url(), ssl=ctx)


# -- what libpq reads again when it connects --------------------------------------------------


def _service_changing_after_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, later: str
) -> Callable[..., str]:
    """A service file that is clean when safepg checks it and holds *later* by the time libpq
    connects (an LDAP service answering otherwise, another process): the password callable
    runs between the two. Returns that callable."""
    services = tmp_path / "pg_service.conf"
    services.write_text("[app]\napplication_name=checked\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "app")

    def password(*_args: object, **_kwargs: object) -> str:
        services.write_text(f"[app]\napplication_name=checked\n{later}\n")
        return PASSWORD[0]

    return password


PASSWORD: list[str] = [""]


def test_a_keylog_file_set_after_the_check_is_not_written(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "sslkeylogfile" not in {o.keyword.decode() for o in pq.Conninfo.get_defaults()}:
        pytest.skip(f"libpq {pq.version()} has no sslkeylogfile (libpq 18 has)")
    keys = tmp_path / "keys.log"
    PASSWORD[0] = server.password
    password = _service_changing_after_the_check(tmp_path, monkeypatch, f"sslkeylogfile={keys}")
    safepg.connect(server.url(), password=password).close()
    assert not keys.exists(), "libpq wrote the session's TLS secrets"


def test_a_crl_directory_set_after_the_check_adds_no_trust_anchor(
    server: PostgresServer,
    certs: Any,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    certs.present("localhost", ca=rogue_ca, ip_addresses=["127.0.0.1"])
    rogue = _rogue_crl_dir(tmp_path / "rogue", server, rogue_ca)
    PASSWORD[0] = server.password
    password = _service_changing_after_the_check(tmp_path, monkeypatch, f"sslcrldir={rogue}")
    with pytest.raises(safepg.UntrustedCertificateError):
        safepg.connect(server.url(), password=password).close()


def test_psycopg2_pins_the_checked_crl_directory_too(
    server: PostgresServer,
    certs: Any,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    import safepg.psycopg2

    certs.present("localhost", ca=rogue_ca, ip_addresses=["127.0.0.1"])
    rogue = _rogue_crl_dir(tmp_path / "rogue", server, rogue_ca)
    PASSWORD[0] = server.password
    password = _service_changing_after_the_check(tmp_path, monkeypatch, f"sslcrldir={rogue}")
    with pytest.raises(psycopg2.OperationalError):
        safepg.psycopg2.connect(server.url(), password=password).close()


@pytest.mark.parametrize("origin", ["url", "env", "service"])
def test_an_empty_sslcompression_is_refused(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    # libpq compresses unless sslcompression starts with 0: an empty value is not the
    # default "0", it asks OpenSSL for compression (CRIME).
    url = server.url()
    if origin == "url":
        url += "&sslcompression="
    elif origin == "env":
        monkeypatch.setenv("PGSSLCOMPRESSION", "")
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text("[app]\nsslcompression=\n")
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "app")
    with pytest.raises(ConfigurationError, match="sslcompression"):
        safepg.connect(url).close()
