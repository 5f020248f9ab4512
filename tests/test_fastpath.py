"""The fast path: learned anchors are a subset, tampering is caught, rotation recovers.

Performance is measured by benchmarks/connect_latency.py, never by timed tests here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import psycopg
import pytest

import safepg
from safepg import UntrustedCertificateError, _cache, _fastpath, _params, _x509
from safepg._deadline import Deadline
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop


@pytest.fixture(scope="session")
def second_ca() -> CertificateAuthority:
    """Another CA in the same trust set: the one the server rotates to."""
    return CertificateAuthority("safepg rotated root CA")


@pytest.fixture(scope="session")
def big_bundle(
    server: PostgresServer,
    second_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """certifi plus both test CAs: a large set, like the ones safepg resolves by default."""
    path = tmp_path_factory.mktemp("bundle") / "bundle.pem"
    path.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem + second_ca.cert_pem)
    return path


def fingerprints(path: str | Path) -> set[str]:
    return {c.sha256 for c in _x509.parse_pem(Path(path).read_bytes())}


def learned(conninfo: str) -> safepg.TrustSource:
    with safepg.connect(conninfo) as conn:
        report = safepg.check(conn)
    assert report.verified
    assert report.trust is not None
    return report.trust


def warm(conninfo: str) -> safepg.TrustSource:
    """The trust a connect uses once the host is learned: the first contact teaches it."""
    first = learned(conninfo)
    assert "narrowed" not in first.label  # the first contact: the full set, and no probe
    return learned(conninfo)


def wait_for_probes() -> None:
    """Join the background probes (hosts the session could not teach)."""
    for thread in threading.enumerate():
        if thread.name == "safepg-fast-path-probe":
            thread.join(30)


def cache_files(cache: Path, pattern: str) -> list[Path]:
    return sorted(cache.glob(pattern))


@pytest.fixture
def cache(clean_env: Path) -> Path:
    return Path(os.environ["SAFEPG_CACHE_DIR"])


# -- the subset property -----------------------------------------------------------------------


def test_warm_connect_uses_only_the_anchor_that_verifies(
    server: PostgresServer, big_bundle: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    assert learned(conninfo).path == str(big_bundle)  # first contact: the full set, no probe
    first = learned(conninfo)
    assert "narrowed to the 1 anchor(s) that verify" in first.label
    assert first.origin == "sslrootcert"
    assert fingerprints(first.path) == fingerprints(server.ca_path)
    assert fingerprints(first.path) <= fingerprints(big_bundle)
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        assert learned(conninfo) == first  # warm: the same file, from memory
    assert "fast path: warm (in memory)" in caplog.text  # not rebuilt from the entries
    _fastpath.clear_memory()
    assert learned(conninfo) == first  # a new process: from the disk cache
    entry = json.loads(cache_files(cache, "host-*.json")[0].read_text())
    assert entry["anchors"] == sorted(fingerprints(server.ca_path))
    assert entry["host"] == "127.0.0.1"
    assert entry["port"] == str(server.port)


def test_small_files_are_private(server: PostgresServer, big_bundle: Path, cache: Path) -> None:
    learned(server.conninfo(sslrootcert=str(big_bundle)))
    assert cache.stat().st_mode & 0o777 == 0o700
    files = list(cache.iterdir())
    assert files
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert not [f for f in files if f.name.startswith(".tmp")]


def test_intermediate_chain_keeps_the_path_to_the_root(
    server: PostgresServer, certs: CertificateShop, tmp_path: Path
) -> None:
    intermediate = server.ca.intermediate("fast path intermediate")
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=intermediate)
    # A set that holds the intermediate as well as the root: both stay, or libpq (which
    # does not accept partial chains) could not reach the root.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        Path(certifi.where()).read_bytes() + server.ca.cert_pem + intermediate.cert_pem
    )
    trust = warm(server.conninfo(sslrootcert=str(bundle)))
    assert fingerprints(trust.path) == fingerprints(server.ca_path) | {
        _x509.parse_pem(intermediate.cert_pem)[0].sha256
    }


def test_anchors_for_walks_issuers_up_to_a_root(
    second_ca: CertificateAuthority, tmp_path: Path
) -> None:
    root = CertificateAuthority("walk root")
    middle = root.intermediate("walk middle")
    leaf = middle.issue("db.example.test")
    index_pem = certifi_pem() + root.cert_pem + middle.cert_pem + second_ca.cert_pem
    index = index_of(index_pem, tmp_path)
    ders = [_x509.parse_pem(leaf.cert_pem)[0].der]  # the server sends only its own certificate
    chosen = {c.sha256 for c in _fastpath.anchors_for(ders, index)}
    assert chosen == {c.sha256 for c in _x509.parse_pem(root.cert_pem + middle.cert_pem)}
    # Nothing in the set issued it: no anchors, so the full set is used.
    stranger = CertificateAuthority("stranger").issue("db.example.test")
    assert _fastpath.anchors_for([_x509.parse_pem(stranger.cert_pem)[0].der], index) == []
    assert _fastpath.anchors_for([b"\x30\x03garbage"], index) == []
    # What does not parse is skipped, not the end of the chain.
    assert {c.sha256 for c in _fastpath.anchors_for([b"\x30\x03garbage", *ders], index)} == chosen


def certifi_pem() -> bytes:
    return Path(certifi.where()).read_bytes()


def index_of(pem: bytes, directory: Path) -> _fastpath._Index:
    path = directory / "index.pem"
    path.write_bytes(pem)
    index = _fastpath._index(str(path))
    assert index is not None
    return index


# certifi holds a root with a negative serial number, which cryptography warns about.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_x509_index_agrees_with_cryptography() -> None:
    from cryptography import x509

    certs = _x509.parse_pem(certifi_pem())
    assert len(certs) == certifi_pem().count(b"BEGIN CERTIFICATE")
    for cert in certs:
        parsed = x509.load_der_x509_certificate(cert.der)
        assert cert.subject == parsed.subject.public_bytes()
        assert cert.issuer == parsed.issuer.public_bytes()
        assert _x509.parse_pem(cert.pem()) == [cert]
    assert _x509.parse_pem(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n") == []
    with pytest.raises(ValueError, match="DER"):
        _x509.parse_der(b"\x30\x84\xff\xff\xff\xff")


# -- tampering ---------------------------------------------------------------------------------


def test_rogue_ca_appended_to_the_small_file_is_detected_and_rebuilt(
    server: PostgresServer, big_bundle: Path, rogue_ca: CertificateAuthority, cache: Path
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = Path(warm(conninfo).path)
    with small.open("ab") as f:
        f.write(rogue_ca.cert_pem)
    assert learned(conninfo).path == str(small)
    assert fingerprints(small) == fingerprints(server.ca_path)  # rewritten, rogue CA gone
    # The same in a new process, where nothing is remembered.
    with small.open("ab") as f:
        f.write(rogue_ca.cert_pem)
    _fastpath.clear_memory()
    assert learned(conninfo).path == str(small)
    assert fingerprints(small) == fingerprints(server.ca_path)


def test_entry_naming_an_anchor_outside_the_set_is_ignored(
    server: PostgresServer, big_bundle: Path, rogue_ca: CertificateAuthority, cache: Path
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    learned(conninfo)
    (entry_path,) = cache_files(cache, "host-*.json")
    entry = json.loads(entry_path.read_text())
    rogue = _x509.parse_pem(rogue_ca.cert_pem)[0].sha256
    entry["anchors"].append(rogue)
    entry_path.write_text(json.dumps(entry))
    _fastpath.clear_memory()
    trust = warm(conninfo)  # ignored: the full set once, then learned again
    assert rogue not in fingerprints(trust.path)
    assert json.loads(entry_path.read_text())["anchors"] == sorted(fingerprints(server.ca_path))
    for garbage in ("{", "[]", '{"version": 1, "anchors": 3}', ""):
        entry_path.write_text(garbage)
        _fastpath.clear_memory()
        assert fingerprints(warm(conninfo).path) == fingerprints(server.ca_path)


def test_a_changed_trust_set_is_learned_afresh(
    server: PostgresServer, big_bundle: Path, tmp_path: Path, cache: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    learned(conninfo)
    bundle.write_bytes(certifi_pem() + server.ca.cert_pem)  # the user edits the file
    learned(conninfo)
    assert len(cache_files(cache, "host-*.json")) == 2  # keyed by the set's digest


# -- rotation and retries ----------------------------------------------------------------------


def test_rotation_to_another_root_of_the_set(
    server: PostgresServer,
    certs: CertificateShop,
    big_bundle: Path,
    second_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    before = warm(conninfo)
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=second_ca)
    with caplog.at_level(logging.INFO, logger="safepg"):
        retried = learned(conninfo)  # the small file fails; one retry with the full set
    assert "retrying once with" in caplog.text
    assert retried.path == str(big_bundle)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="safepg"):
        after = learned(conninfo)  # learned again after the retry: no more retries
    assert "retrying" not in caplog.text
    assert fingerprints(after.path) == {c.sha256 for c in _x509.parse_pem(second_ca.cert_pem)}
    assert after.path != before.path


def test_rotation_to_an_untrusted_root_still_fails_closed(
    server: PostgresServer,
    certs: CertificateShop,
    big_bundle: Path,
    rogue_ca: CertificateAuthority,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    warm(conninfo)
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(conninfo)
    assert info.value.trust is not None
    assert info.value.trust.path == str(big_bundle)  # the error names the full set


def test_other_failures_are_not_retried(
    server: PostgresServer, big_bundle: Path, caplog: pytest.LogCaptureFixture, cache: Path
) -> None:
    learned(server.conninfo(sslrootcert=str(big_bundle)))
    with (
        caplog.at_level(logging.DEBUG, logger="safepg"),
        pytest.raises(psycopg.OperationalError, match="password authentication failed"),
    ):
        safepg.connect(server.conninfo(sslrootcert=str(big_bundle), password="wrong"))
    assert "retrying" not in caplog.text
    assert cache_files(cache, "host-*.json")  # what was learned is kept


# -- probe limits and fallbacks ----------------------------------------------------------------


def test_untrusted_server_teaches_nothing(
    server: PostgresServer,
    certs: CertificateShop,
    big_bundle: Path,
    rogue_ca: CertificateAuthority,
    cache: Path,
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(conninfo)
    assert info.value.trust is not None
    assert info.value.trust.path == str(big_bundle)
    wait_for_probes()
    assert not cache_files(cache, "host-*.json")  # only a verified session teaches


def test_a_chain_the_set_did_not_issue_is_not_learned_again_at_once(
    server: PostgresServer,
    rogue_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(server.ca_path))
    with safepg.connect(conninfo) as conn:
        facts = _fastpath.session_facts(plan(conninfo), conn.pgconn)
    assert facts[1] is not None
    other = tmp_path / "other.pem"  # a set that did not issue the server's chain
    other.write_bytes(rogue_ca.cert_pem + CertificateAuthority("another root").cert_pem)
    p = dataclasses.replace(
        plan(conninfo), trust=safepg.TrustSource(str(other), "other", "sslrootcert")
    )
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        _fastpath.learn_from_session(p, *facts, 150000)
    assert "no certificate in the trust set issued its chain" in caplog.text
    assert not _fastpath.worth_learning(p)  # not tried again for a while


def plan(conninfo: str) -> _params.Plan:
    return _params.build_plan(conninfo, {})


def test_probe_honours_connect_timeout(big_bundle: Path, stalled_port: int) -> None:
    # Probes are only made, in the background, for hosts a session could not teach.
    conninfo = f"host=localhost hostaddr=127.0.0.1 port={stalled_port} connect_timeout=2"
    p = plan(f"{conninfo} sslrootcert={big_bundle}")
    found = _fastpath._applicable(p)
    assert found is not None
    index, keys = found
    done = threading.Event()
    result: list[object] = []

    def run() -> None:
        budget = Deadline(p.timeout).probe_budget()
        result.append(_fastpath._probe_host(p, p.targets[0], keys[0], index, budget))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "the probe ignored connect_timeout"
    assert result == [None]  # no anchors learned: the full set is used
    assert not _fastpath.worth_learning(p)


def test_probe_dials_hostaddr(
    server: PostgresServer, certs: CertificateShop, big_bundle: Path
) -> None:
    certs.present("db.fastpath.test")
    trust = warm(
        server.conninfo(host="db.fastpath.test", hostaddr="127.0.0.1", sslrootcert=str(big_bundle))
    )
    assert "db.fastpath.test" in trust.label


def test_multi_host_is_narrowed_only_once_each_host_was_verified(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    port = server.port
    conninfo = server.conninfo(
        host="localhost,127.0.0.1", port=f"{port},{port}", sslrootcert=str(big_bundle)
    )
    # Sessions land on the first host: the second is never probed, so the full set stays.
    for _ in range(2):
        assert learned(conninfo).path == str(big_bundle)
    wait_for_probes()
    assert len(cache_files(cache, "host-*.json")) == 1
    # Once a verified session has been seen on the other host too, the union is used.
    learned(server.conninfo(host="127.0.0.1", sslrootcert=str(big_bundle)))
    trust = learned(conninfo)
    assert f"localhost:{port}, 127.0.0.1:{port}" in trust.label
    assert fingerprints(trust.path) == fingerprints(server.ca_path)
    assert len(cache_files(cache, "host-*.json")) == 2


def test_a_narrowed_multi_host_connect_that_lands_elsewhere_forgets(
    server: PostgresServer,
    big_bundle: Path,
    cache: Path,
    closed_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The security review's case: the first host's learned anchors fail (it moved to another
    # root of the set), libpq silently moves on to the next host, and would do so for good.
    conninfo = server.conninfo(
        host="localhost,127.0.0.1",
        port=f"{closed_port},{server.port}",
        sslrootcert=str(big_bundle),
    )
    warm(server.conninfo(host="127.0.0.1", sslrootcert=str(big_bundle)))
    with safepg.connect(conninfo) as conn:
        assert len(cache_files(cache, "host-*.json")) == 1
        with caplog.at_level(logging.INFO, logger="safepg"):
            _fastpath.check_landing(plan(conninfo), conn.pgconn)
    assert "the next connect uses the full trust set" in caplog.text
    assert cache_files(cache, "host-*.json") == []


def test_where_the_session_cannot_be_read_a_background_probe_teaches(
    server: PostgresServer, big_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another TLS library than OpenSSL, or a libpq that cannot be found: no chain to read.
    from safepg import _libpq

    monkeypatch.setattr(_libpq, "presented_chain", lambda pgconn: None)
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    assert learned(conninfo).path == str(big_bundle)  # not held up by the probe
    wait_for_probes()
    assert fingerprints(learned(conninfo).path) == fingerprints(server.ca_path)


def test_the_session_chain_is_what_the_server_presented(server: PostgresServer) -> None:
    from safepg import _libpq, _probe

    with safepg.connect(server.conninfo()) as conn:
        chain = _libpq.presented_chain(conn.pgconn)
    probed = _probe.presented_chain("127.0.0.1", server.port, server_hostname=None, timeout=5)
    assert probed is not None
    assert chain == list(probed.chain)
    with psycopg.connect(server.conninfo(sslmode="disable")) as plain:
        assert _libpq.presented_chain(plain.pgconn) is None  # no TLS: nothing to read


def test_nothing_is_read_when_another_openssl_is_loaded_globally(server: PostgresServer) -> None:
    # The security review's case: with the system's libssl preloaded, psycopg-binary's libpq
    # makes its sessions with that OpenSSL, and the bundled one must not read their objects.
    import ctypes.util

    pytest.importorskip("psycopg_binary")
    system_ssl = ctypes.util.find_library("ssl")
    if system_ssl is None:
        pytest.skip("no system libssl to preload")
    code = (
        "import sys, safepg\n"
        "from safepg import _libpq\n"
        "with safepg.connect(sys.argv[1]) as conn:\n"
        "    print(safepg.check(conn).verified, _libpq._chain_fns(), "
        "_libpq.presented_chain(conn.pgconn))\n"
    )
    env = {**os.environ, "PSYCOPG_IMPL": "binary", "LD_PRELOAD": system_ssl}
    out = subprocess.run(
        [sys.executable, "-c", code, server.conninfo()],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # Verified by libpq; the bundled OpenSSL's functions are not even looked up for reading.
    assert out.stdout.split() == ["True", "None", "None"]


def test_a_single_anchor_set_is_left_alone(server: PostgresServer, cache: Path) -> None:
    trust = learned(server.conninfo())
    assert trust.path == str(server.ca_path)  # the caller's own file, not a copy
    entries = cache_files(cache, "host-*.json") if cache.exists() else []
    if _fastpath.libpq_has_direct():  # still learned: whether the host takes direct TLS
        (entry,) = entries
        assert json.loads(entry.read_text())["direct_tls"] is (server.major_version >= 17)
    else:
        assert entries == []
    assert not cache_files(cache, "anchors-*.pem") if cache.exists() else True


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_opt_out(
    server: PostgresServer, big_bundle: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    if how == "argument":
        conn = safepg.connect(conninfo, fast_path=False)
    else:
        monkeypatch.setenv("SAFEPG_FAST_PATH", "off")
        conn = safepg.connect(conninfo)
    with conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert trust.path == str(big_bundle)


def test_connect_async_learns_too(server: PostgresServer, big_bundle: Path) -> None:
    async def main() -> safepg.TrustSource | None:
        conn = await safepg.connect_async(server.conninfo(sslrootcert=str(big_bundle)))
        async with conn:
            return (await safepg.check_async(conn)).trust

    assert asyncio.run(main()) is not None  # the first contact teaches
    trust = asyncio.run(main())
    assert trust is not None
    assert "narrowed" in trust.label


# -- concurrency -------------------------------------------------------------------------------


def test_cold_threads_all_succeed(server: PostgresServer, big_bundle: Path, cache: Path) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))

    def one(_: int) -> str:
        return learned(conninfo).path

    with ThreadPoolExecutor(16) as pool:
        paths = set(pool.map(one, range(32)))
    # Each is verified: with the full set (a first contact), or with the file learned.
    assert paths - {str(big_bundle)} == {learned(conninfo).path}
    assert_consistent(cache, server)


def test_cold_processes_all_succeed(server: PostgresServer, big_bundle: Path, cache: Path) -> None:
    code = (
        "import sys, safepg\n"
        "for _ in range(5):\n"
        "    with safepg.connect(sys.argv[1]) as c:\n"
        "        assert safepg.check(c).verified\n"
    )
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    procs = [
        subprocess.Popen([sys.executable, "-c", code, conninfo], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    assert_consistent(cache, server)


def assert_consistent(cache: Path, server: PostgresServer) -> None:
    (entry,) = cache_files(cache, "host-*.json")
    assert json.loads(entry.read_text())["anchors"] == sorted(fingerprints(server.ca_path))
    (small,) = cache_files(cache, "anchors-*.pem")
    assert fingerprints(small) == fingerprints(server.ca_path)
    assert not list(cache.glob(".tmp*"))


def test_direct_tls_probe_against_a_server_that_lacks_it(server: PostgresServer) -> None:
    from safepg import _probe

    normal = _probe.presented_chain("127.0.0.1", server.port, server_hostname=None, timeout=5)
    assert normal is not None
    assert normal.tls
    leaf = _x509.parse_der(normal.chain[0])
    assert leaf.issuer == _x509.parse_pem(server.ca.cert_pem)[0].subject
    if server.major_version < 17:
        # TLS straight away is taken for a malformed startup packet: nothing is learned.
        assert (
            _probe.presented_chain(
                "127.0.0.1", server.port, server_hostname=None, timeout=5, direct=True
            )
            is None
        )


def test_a_one_certificate_file_without_direct_tls_to_learn_is_not_learned(
    server: PostgresServer, cache: Path
) -> None:
    # Nothing to gain: the set is as small as it gets, and direct TLS is off. No cache files.
    conninfo = server.conninfo(sslrootcert=str(server.ca_path))
    for _ in range(2):
        with safepg.connect(conninfo, direct_tls=False) as conn:
            assert safepg.check(conn).verified
    assert cache_files(cache, "host-*.json") == []


def test_a_failure_with_the_full_set_is_not_retried(
    server: PostgresServer,
    big_bundle: Path,
    cache: Path,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with (
        caplog.at_level(logging.DEBUG, logger="safepg"),
        pytest.raises(safepg.UntrustedCertificateError),
    ):
        safepg.connect(server.conninfo(sslrootcert=str(big_bundle)))
    assert "retrying once" not in caplog.text


def test_a_small_file_whose_mode_changed_is_written_again(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = Path(warm(conninfo).path)
    small.chmod(0o644)  # the same inode, size and mtime: only _cache's checks see it
    assert learned(conninfo).path == str(small)
    assert small.stat().st_mode & 0o777 == 0o600


def test_a_small_file_in_a_cache_others_can_now_write_is_not_used(
    server: PostgresServer, big_bundle: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    warm(conninfo)
    cache.chmod(0o777)
    try:
        with caplog.at_level(logging.WARNING, logger="safepg"):
            assert learned(conninfo).path == str(big_bundle)
    finally:
        cache.chmod(0o700)
    assert "not using the cache" in caplog.text


@pytest.mark.skipif(
    psycopg.pq.version() < 170000, reason="a one-certificate set is learned for direct TLS only"
)
def test_a_set_learned_whole_stays_warm_in_memory(
    server: PostgresServer, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = server.conninfo(sslrootcert=str(server.ca_path))  # one certificate: kept whole
    learned(conninfo)
    learned(conninfo)
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        assert learned(conninfo).path == str(server.ca_path)
    assert "fast path: warm (in memory)" in caplog.text


def test_a_small_file_that_cannot_be_written_leaves_the_full_set(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    import resource

    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    learned(conninfo)  # the first contact: learns the anchor, writes its small file
    for small in cache_files(cache, "anchors-*.pem"):
        small.unlink()  # made again by the next connect, which cannot write it
    _fastpath.clear_memory(keep_indexes=True)
    _cache.clear_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # writes past 64 bytes fail (EFBIG)
    try:
        assert learned(conninfo).path == str(big_bundle)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert cache_files(cache, "anchors-*.pem") == []
