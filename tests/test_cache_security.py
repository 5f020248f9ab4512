"""Trust files on disk: another local user must not be able to choose what libpq trusts.

The attacker here can write to a directory above safepg's cache (a group-shared directory, a
world-writable volume used as XDG_CACHE_HOME). Such a user can rename the cache directory away
and put their own in its place, with their CA under the computable file name. Tests run as
root, so the "other user" is played by the test itself; what matters is what safepg accepts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

import certifi
import pytest

import safepg
from safepg import ConfigurationError, UntrustedCertificateError, _cache, _fastpath, _params
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop


@pytest.fixture
def cert_dir(server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SSL_CERT_DIR holding the test CA: safepg exports it to a file in its cache for libpq."""
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "ca.pem").write_bytes(server.ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_DIR", str(directory))
    monkeypatch.setenv("SSL_CERT_FILE", "")
    return directory


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A parent directory for the cache; the tests make it writable by others when they need."""
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o755)
    monkeypatch.setenv("SAFEPG_CACHE_DIR", str(parent / "safepg"))
    return parent


def _plant(cache: Path, names: list[str], pem: bytes) -> None:
    """The attack: move the cache away, make a new one, put *pem* under each of *names*."""
    cache.rename(cache.with_name("safepg-moved-away"))
    cache.mkdir(mode=0o700)
    for name in names:
        (cache / name).write_bytes(pem)
        (cache / name).chmod(0o600)


def test_cache_under_a_directory_others_can_write_is_refused(
    server: PostgresServer, cert_dir: Path, shared: Path
) -> None:
    shared.chmod(0o777)  # no sticky bit: anyone may rename what is in it
    with pytest.raises(ConfigurationError, match="can be written by other users") as info:
        safepg.connect(server.conninfo(sslrootcert=None), fast_path=False)
    assert str(shared) in str(info.value)
    assert not (shared / "safepg").exists() or not list((shared / "safepg").iterdir())


def test_swapped_cache_directory_is_noticed_by_a_running_process(
    server: PostgresServer,
    cert_dir: Path,
    shared: Path,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
) -> None:
    """Fast path off: the OS store exported from SSL_CERT_DIR is the file libpq reads."""
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        exported = Path(safepg.check(conn).trust.path)  # type: ignore[union-attr]
    cache = shared / "safepg"
    assert exported.parent == cache.resolve()
    # Later the parent becomes writable by others, and the attacker swaps the directory.
    shared.chmod(0o777)
    _plant(cache, [exported.name], rogue_ca.cert_pem)
    certs.present("localhost", "127.0.0.1", ca=rogue_ca)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        safepg.connect(server.conninfo(sslrootcert=None), fast_path=False)


def test_swapped_anchors_file_is_not_used_by_the_fast_path(
    server: PostgresServer,
    shared: Path,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
    conninfo = server.conninfo(sslrootcert=str(bundle))
    safepg.connect(conninfo).close()  # the first contact teaches the fast path
    with safepg.connect(conninfo) as conn:
        small = Path(safepg.check(conn).trust.path)  # type: ignore[union-attr]
    cache = shared / "safepg"
    assert small.parent == cache.resolve()
    assert small.name.startswith("anchors-")
    entries = {p.name: p.read_bytes() for p in cache.glob("host-*.json")}
    shared.chmod(0o777)
    _plant(cache, [small.name], rogue_ca.cert_pem)
    for name, data in entries.items():
        (cache / name).write_bytes(data)
        (cache / name).chmod(0o600)
    certs.present("localhost", "127.0.0.1", ca=rogue_ca)
    with caplog.at_level(logging.WARNING, logger="safepg"):
        with pytest.raises(UntrustedCertificateError):
            safepg.connect(conninfo)
        certs.server.reset_certificate()
        # The real server: verified against the caller's own file, the cache left alone.
        for _ in range(2):
            with safepg.connect(conninfo) as conn:
                assert safepg.check(conn).trust.path == str(bundle)  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if "not using the cache" in r.getMessage()]
    assert len(warnings) == 1, "warned once, not on every connect"
    assert str(shared) in warnings[0].getMessage()


def test_sticky_root_directory_is_accepted_above_the_cache(
    server: PostgresServer, cert_dir: Path, shared: Path
) -> None:
    shared.chmod(0o1777)  # like /tmp: others may add entries but not rename ours
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        assert safepg.check(conn).verified


def test_sticky_directory_is_refused_as_the_cache_itself(
    server: PostgresServer, cert_dir: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared.chmod(0o1777)
    monkeypatch.setenv("SAFEPG_CACHE_DIR", str(shared))
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        safepg.connect(server.conninfo(sslrootcert=None), fast_path=False)


def test_symlinked_cache_is_resolved_and_its_target_checked(
    server: PostgresServer, cert_dir: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shared / "real"
    real.mkdir(mode=0o700)
    link = shared / "link"
    link.symlink_to(real)
    monkeypatch.setenv("SAFEPG_CACHE_DIR", str(link))
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        path = Path(safepg.check(conn).trust.path)  # type: ignore[union-attr]
    assert path.parent == real.resolve(), "libpq gets the resolved path, not the link"
    real.chmod(0o777)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        safepg.connect(server.conninfo(sslrootcert=None), fast_path=False)


def test_planted_files_that_are_not_private_are_rewritten(
    server: PostgresServer, cert_dir: Path, shared: Path, rogue_ca: CertificateAuthority
) -> None:
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        exported = Path(safepg.check(conn).trust.path)  # type: ignore[union-attr]
    good = exported.read_bytes()
    # Same content, but readable and writable by others, or a symbolic link: not ours.
    exported.chmod(0o666)
    _cache.clear_memory()
    _reset_trust_memos()
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        assert safepg.check(conn).verified
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    elsewhere = shared / "elsewhere.pem"
    elsewhere.write_bytes(good + rogue_ca.cert_pem)
    exported.unlink()
    exported.symlink_to(elsewhere)
    _cache.clear_memory()
    _reset_trust_memos()
    with safepg.connect(server.conninfo(sslrootcert=None), fast_path=False) as conn:
        assert safepg.check(conn).verified
    assert not exported.is_symlink()
    assert exported.read_bytes() == good


def _reset_trust_memos() -> None:
    from safepg import _trust

    _trust._os_store_memo.clear()
    _trust._valid_files.clear()


def test_memo_race_does_not_raise(server: PostgresServer, tmp_path: Path, shared: Path) -> None:
    """Item 4 of the security review: threads reading the memo while the anchors file gets a
    new inode once raised a bare KeyError out of connect."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
    conninfo = server.conninfo(sslrootcert=str(bundle))
    safepg.connect(conninfo).close()  # the first contact teaches the fast path
    with safepg.connect(conninfo) as conn:
        small = Path(safepg.check(conn).trust.path)  # type: ignore[union-attr]
    plan = _params.build_plan(conninfo, {})
    content = small.read_bytes()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        while not stop.is_set():
            tmp = small.with_suffix(".new")
            tmp.write_bytes(content)
            os.chmod(tmp, 0o600)
            os.replace(tmp, small)  # a new inode, same content

    def read() -> None:
        try:
            for _ in range(300):
                # The learned file, or None (the full set) while the file is being replaced.
                found = _fastpath.cached(plan)
                assert found is None or found.trust.path in (str(small), str(bundle))
        except BaseException as ex:
            errors.append(ex)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        readers = [threading.Thread(target=read) for _ in range(24)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        stop.set()
        churner.join()
    assert not errors, repr(errors[0])


# -- a trust file found again by name (a fresh process's warm start) --------------------------


def test_a_trust_file_is_found_again_only_by_its_own_name_and_content(shared: Path) -> None:
    pem = CertificateAuthority("found again").cert_pem
    sha = hashlib.sha256(pem).hexdigest()
    path = _cache.write_trust_file("anchors", pem)
    _cache.clear_memory()  # as in a fresh process: nothing known in memory
    assert _cache.existing_trust_file(path.name, sha) == path
    assert _cache.existing_trust_file(path.name, sha) == path  # known now: no second read
    # The same content under a name not made from its digest, or names outside the pattern.
    other = path.with_name(f"anchors-{'0' * 32}.pem")
    other.write_bytes(pem)
    other.chmod(0o600)
    for name in (other.name, f"../{path.name}", f"anchors1-{sha[:32]}.pem", f"{path.name}.bak"):
        assert _cache.existing_trust_file(name, sha) is None, name
    assert _cache.existing_trust_file(path.name, sha[:63]) is None  # not a whole digest
    # Content that no longer hashes to the digest, and a file that is gone.
    path.write_bytes(pem + b"\n")
    _cache.clear_memory()
    assert _cache.existing_trust_file(path.name, sha) is None
    path.unlink()
    assert _cache.existing_trust_file(path.name, sha) is None


def test_no_trust_file_is_found_in_a_cache_others_can_write(shared: Path) -> None:
    pem = CertificateAuthority("in a shared cache").cert_pem
    path = _cache.write_trust_file("anchors", pem)
    _cache.clear_memory()
    path.parent.chmod(0o777)
    try:
        assert _cache.existing_trust_file(path.name, hashlib.sha256(pem).hexdigest()) is None
    finally:
        path.parent.chmod(0o700)
