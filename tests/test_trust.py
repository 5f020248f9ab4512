"""Trust resolution: each source in order, and the refusal to fall back from a named file."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import certifi
import pytest

import safepg
from safepg import ConfigurationError, _trust
from safepg.providers import profile_for_host
from safepg.testing import CertificateAuthority

RDS_HOST = "mydb.abc123.eu-central-1.rds.amazonaws.com"


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    return str(CertificateAuthority("mine").write_cert(tmp_path / "mine.pem"))


@pytest.fixture
def no_os_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A machine whose OS has no trust store (no env, no default paths, no well-known files)."""
    missing = str(tmp_path / "missing")
    monkeypatch.setattr(_trust, "WELL_KNOWN_STORE_FILES", ())
    monkeypatch.setattr(
        ssl,
        "get_default_verify_paths",
        lambda: ssl.DefaultVerifyPaths(None, None, "", missing, "", missing),  # type: ignore[arg-type]
    )


def test_callers_sslrootcert_in_conninfo(ca_file: str) -> None:
    src = safepg.resolve_trust(f"host={RDS_HOST} sslrootcert={ca_file}")
    assert (src.path, src.origin, src.label) == (
        ca_file,
        "sslrootcert",
        "sslrootcert from the conninfo string",
    )


def test_callers_sslrootcert_in_kwargs(ca_file: str) -> None:
    src = safepg.resolve_trust(host=RDS_HOST, sslrootcert=ca_file)
    assert src.label == "sslrootcert from the keyword argument sslrootcert"


def test_pgsslrootcert(ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", ca_file)
    src = safepg.resolve_trust(host=RDS_HOST)
    assert (src.path, src.origin) == (ca_file, "PGSSLROOTCERT")
    assert "PGSSLROOTCERT environment variable" in src.label


def test_conninfo_wins_over_pgsslrootcert(
    ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = str(CertificateAuthority().write_cert(tmp_path / "other.pem"))
    monkeypatch.setenv("PGSSLROOTCERT", other)
    assert safepg.resolve_trust(host="db.example.com", sslrootcert=ca_file).path == ca_file


def test_libpq_default_root_crt(ca_file: str, clean_env: Path) -> None:
    root = clean_env / ".postgresql" / "root.crt"
    root.parent.mkdir()
    root.write_bytes(Path(ca_file).read_bytes())
    src = safepg.resolve_trust(host=RDS_HOST)
    assert (src.path, src.origin) == (str(root), "libpq-default")


def test_home_unset_falls_back_to_password_database(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    monkeypatch.delenv("HOME")
    expected = Path(pwd.getpwuid(os.getuid()).pw_dir, ".postgresql", "root.crt")
    assert _trust.libpq_default_root() == expected
    # Resolution still works without HOME.
    assert safepg.resolve_trust(host=RDS_HOST).origin in ("bundled", "libpq-default")


@pytest.mark.parametrize(
    ("host", "label"),
    [
        (RDS_HOST, "bundled Amazon RDS roots"),
        ("cluster-1.cluster-ro-abc123.us-east-1.rds.amazonaws.com", "bundled Amazon RDS roots"),
        ("MyDB.ABC123.US-EAST-1.RDS.AMAZONAWS.COM", "bundled Amazon RDS roots"),
        ("mydb.abc123.eu-west-1.rds.amazonaws.com.", "bundled Amazon RDS roots"),
        ("mydb.abc123.us-gov-west-1.rds.amazonaws.com", "bundled Amazon RDS GovCloud roots"),
        ("mydb.abc123.us-gov-east-1.rds.amazonaws.com", "bundled Amazon RDS GovCloud roots"),
    ],
)
def test_bundled_provider_by_host(host: str, label: str) -> None:
    src = safepg.resolve_trust(host=host)
    assert (src.label, src.origin) == (label, "bundled")
    assert Path(src.path).is_file()


@pytest.mark.parametrize(
    "host",
    [
        "rds.amazonaws.com.evil.example",
        "x-rds.amazonaws.com",
        "mydb.rds.amazonaws.co",
        "myproxy.proxy-abc123.us-east-1.rds.amazonaws.com",  # RDS Proxy: public Amazon roots
        "db.example.com",
    ],
)
def test_no_bundle_for_other_hosts(host: str) -> None:
    profile = profile_for_host(host)
    assert profile is None or profile.bundle is None
    assert safepg.resolve_trust(host=host).origin in ("os-store", "certifi")


def test_ssl_cert_file_is_the_os_store(ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    src = safepg.resolve_trust(host="db.example.com")
    assert (src.path, src.label) == (ca_file, "OS trust store (SSL_CERT_FILE)")


def test_ssl_cert_dir_is_written_to_one_file(
    ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certdir = tmp_path / "certs"
    certdir.mkdir()
    (certdir / "a.pem").write_bytes(Path(ca_file).read_bytes())
    (certdir / "b.pem").write_bytes(CertificateAuthority("b").cert_pem)
    (certdir / "README").write_text("not a certificate")
    monkeypatch.setenv("SSL_CERT_DIR", str(certdir))
    src = safepg.resolve_trust(host="db.example.com")
    assert src.origin == "os-store"
    assert src.label == f"OS trust store (SSL_CERT_DIR={certdir})"
    assert Path(src.path).read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert os.stat(src.path).st_mode & 0o077 == 0
    ssl.create_default_context(cafile=src.path)  # loads as a CA file


def test_default_os_store() -> None:
    src = safepg.resolve_trust(host="db.example.com")
    assert src.origin == "os-store"
    assert Path(src.path).is_file()


def test_certifi_is_the_last_resort(no_os_store: None) -> None:
    src = safepg.resolve_trust(host="db.example.com")
    assert (src.path, src.origin) == (certifi.where(), "certifi")
    assert src.label.startswith("certifi ")


def test_sslrootcert_system_means_the_os_store(
    ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    src = safepg.resolve_trust(host="db.example.com", sslrootcert="system")
    assert (src.path, src.origin) == (ca_file, "os-store")
    assert "sslrootcert=system" in src.label
    assert safepg.secure_conninfo(host="db.example.com", sslrootcert="system").count(ca_file) == 1


def test_sslrootcert_system_without_os_store_fails(no_os_store: None) -> None:
    with pytest.raises(ConfigurationError, match="ca-certificates"):
        safepg.resolve_trust(host="db.example.com", sslrootcert="system")


BAD_KINDS = ["missing", "empty", "garbage", "directory", "der"]
NAMED_SOURCES = ["conninfo", "PGSSLROOTCERT", "SSL_CERT_FILE", "root.crt"]


# A missing root.crt is simply not used, as libpq does; a bad one that exists is an error.
@pytest.mark.parametrize(
    ("kind", "source"),
    [(k, s) for s in NAMED_SOURCES for k in BAD_KINDS if (k, s) != ("missing", "root.crt")],
)
def test_named_bad_file_never_falls_back(
    kind: str, source: str, tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.pem"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\xffnot a certificate\n" * 10)
    elif kind == "directory":
        path.mkdir()
    elif kind == "der":
        path.write_bytes(ssl.PEM_cert_to_DER_cert(CertificateAuthority().cert_pem.decode()))
    kwargs: dict[str, Any] = {"host": "db.example.com"}
    if source == "conninfo":
        kwargs["sslrootcert"] = str(path)
        named = "the keyword argument sslrootcert"
    elif source == "PGSSLROOTCERT":
        monkeypatch.setenv("PGSSLROOTCERT", str(path))
        named = "the PGSSLROOTCERT environment variable"
    elif source == "SSL_CERT_FILE":
        monkeypatch.setenv("SSL_CERT_FILE", str(path))
        named = "the SSL_CERT_FILE environment variable"
    else:
        root = clean_env / ".postgresql" / "root.crt"
        root.parent.mkdir()
        path.rename(root)
        path = root
        named = "libpq's default location"
    with pytest.raises(ConfigurationError) as info:
        safepg.resolve_trust(**kwargs)
    assert str(path) in str(info.value)
    assert named in str(info.value)


def test_multi_host_with_different_providers_uses_the_union(ca_file: str) -> None:
    src = safepg.resolve_trust(host=f"{RDS_HOST},db.example.com")
    assert src.origin == "combined"
    assert "bundled Amazon RDS roots" in src.label
    pem = Path(src.path).read_bytes()
    assert pem.count(b"BEGIN CERTIFICATE") > 102
    assert os.stat(src.path).st_mode & 0o077 == 0


def test_multi_host_same_provider(ca_file: str) -> None:
    other = RDS_HOST.replace("mydb", "replica")
    assert safepg.resolve_trust(host=f"{RDS_HOST},{other}").label == "bundled Amazon RDS roots"


def test_cache_dir_writable_by_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "shared-cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv("SAFEPG_CACHE_DIR", str(cache))
    with pytest.raises(ConfigurationError, match="not safe for trust files"):
        safepg.resolve_trust(host=f"{RDS_HOST},db.example.com")


def test_tampered_cache_file_is_rewritten(tmp_path: Path) -> None:
    src = safepg.resolve_trust(host=f"{RDS_HOST},db.example.com")
    good = Path(src.path).read_bytes()
    rogue = CertificateAuthority("rogue").cert_pem
    Path(src.path).write_bytes(good + rogue)
    # Noticed both in this process (the file changed since it was written) ...
    again = safepg.resolve_trust(host=f"{RDS_HOST},db.example.com")
    assert again.path == src.path
    assert Path(again.path).read_bytes() == good
    # ... and in a new one, which remembers nothing.
    Path(src.path).write_bytes(good + rogue)
    _trust._union_memo.clear()
    again = safepg.resolve_trust(host=f"{RDS_HOST},db.example.com")
    assert Path(again.path).read_bytes() == good


def test_trust_source_str() -> None:
    src = safepg.resolve_trust(host=RDS_HOST)
    assert str(src) == f"bundled Amazon RDS roots ({src.path})"


def test_the_os_store_is_shown_with_its_path_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 24: "OS trust store (/usr/lib/ssl/cert.pem) (/usr/lib/ssl/cert.pem)".
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    found = _trust.os_store()
    if found is None:
        pytest.skip("this machine has no OS trust store file")
    assert str(found).count(found.path) == 1, str(found)


# -- decisions the mutation stage showed untested (mutation/RESULTS.md) -----------------------


def test_a_named_file_is_the_callers_unless_it_came_from_pgsslrootcert(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certifi.contents().encode())
    assert _trust.resolve(str(ca), "the conninfo string", []).origin == "sslrootcert"
    assert _trust.resolve(str(ca), "PGSSLROOTCERT", [], from_env=True).origin == "PGSSLROOTCERT"


@pytest.mark.parametrize("first", [0, 1])
def test_every_host_of_a_list_gets_its_anchors(first: int) -> None:
    # A host with no provider set (the OS store) and an RDS host, in either order: both sets.
    hosts = ["db.example.com", "mydb.abc123.eu-west-1.rds.amazonaws.com"]
    if first:
        hosts.reverse()
    found = _trust.resolve(None, "nothing", hosts)
    assert found.origin == "combined"
    assert "bundled Amazon RDS roots" in found.label
