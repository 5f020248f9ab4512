"""One route for every libpq driver: psycopg2 on the fast path, and fresh processes that start warm.

Performance is measured by benchmarks/route_cost.py and benchmarks/connect_latency.py, never by
timed tests here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import certifi
import psycopg
import psycopg2
import psycopg2.extensions
import pytest

import safepg
import safepg.psycopg2
from safepg import _cache, _fastpath, _params, _trust, _x509
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop
from .test_fastpath import fingerprints, learned, warm
from .test_guarantees import in_child, world  # noqa: F401 - world: a fixture


@pytest.fixture(scope="module")
def second_ca() -> CertificateAuthority:
    """Another CA in the same trust set: the one the server rotates to."""
    return CertificateAuthority("safepg route rotated root CA")


@pytest.fixture(scope="module")
def big_bundle(
    server: PostgresServer,
    second_ca: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """certifi plus both test CAs: a large set, like the ones safepg resolves by default."""
    path = tmp_path_factory.mktemp("bundle") / "bundle.pem"
    path.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem + second_ca.cert_pem)
    return path


@pytest.fixture
def cache(clean_env: Path) -> Path:
    return Path(os.environ["SAFEPG_CACHE_DIR"])


def wait_for_threads() -> None:
    """Wait for the fast path's background work: probes (threads) and checks of a fresh start."""
    for thread in threading.enumerate():
        if thread.name.startswith("safepg-fast-path-"):
            thread.join(30)
    assert _fastpath.checks_done(30)


def psycopg2_trust(conninfo: str) -> str:
    """The sslrootcert a safepg.psycopg2 connect gave libpq (checked to be verified)."""
    conn = safepg.psycopg2.connect(conninfo)
    try:
        assert conn.info.ssl_in_use
        dsn = conn.get_dsn_parameters()
        assert dsn["sslmode"] == "verify-full"
        return str(dsn["sslrootcert"])
    finally:
        conn.close()


# -- psycopg2 takes the same route ---------------------------------------------------------------


def test_psycopg2_uses_the_anchors_a_psycopg_session_taught(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = warm(conninfo)
    path = psycopg2_trust(conninfo)
    assert path == small.path
    assert fingerprints(path) == fingerprints(server.ca_path)  # a subset of the full set


def test_psycopg2_alone_learns_a_single_host_by_a_background_probe(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    # psycopg2 cannot hand over the chain libpq verified: the first connect uses the full set,
    # and a probe in the background reads what the host presents.
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    assert psycopg2_trust(conninfo) == str(big_bundle)
    wait_for_threads()
    assert fingerprints(psycopg2_trust(conninfo)) == fingerprints(server.ca_path)


def test_psycopg2_retries_the_full_set_after_a_rotation(
    server: PostgresServer,
    certs: CertificateShop,
    big_bundle: Path,
    second_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    warm(conninfo)
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=second_ca)
    with caplog.at_level(logging.INFO, logger="safepg"):
        assert psycopg2_trust(conninfo) == str(big_bundle)
    assert "retrying once with" in caplog.text


def test_psycopg2_rotation_to_an_untrusted_root_fails_closed(
    server: PostgresServer,
    certs: CertificateShop,
    big_bundle: Path,
    rogue_ca: CertificateAuthority,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    warm(conninfo)
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(safepg.psycopg2.UntrustedCertificateError) as info:
        safepg.psycopg2.connect(conninfo)
    assert isinstance(info.value, psycopg2.OperationalError)
    assert info.value.trust is not None
    assert info.value.trust.path == str(big_bundle)  # the error names the full set


def test_psycopg2_fast_path_off(server: PostgresServer, big_bundle: Path, cache: Path) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    warm(conninfo)
    conn = safepg.psycopg2.connect(conninfo, fast_path=False)
    try:
        assert conn.get_dsn_parameters()["sslrootcert"] == str(big_bundle)
    finally:
        conn.close()


def _learned_direct(conninfo: str, directory: Path) -> _params.Plan:
    """A host learned (its entry then marked as taking direct TLS), and its plan."""
    safepg.connect(conninfo).close()
    wait_for_threads()
    for entry_path in sorted(directory.glob("host-*.json")):
        entry = json.loads(entry_path.read_text())
        entry["direct_tls"] = True
        entry_path.write_text(json.dumps(entry))
    for record in directory.glob("plan-*.json"):
        record.unlink()
    _fastpath.clear_memory()
    return _params.build_plan(conninfo, {})


def test_direct_tls_only_for_a_libpq_that_knows_it(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    # The route asks the driver's own libpq: psycopg2's may be older than psycopg's.
    if not _fastpath.libpq_has_direct():
        pytest.skip("psycopg's libpq does not learn direct TLS")
    plan = _learned_direct(server.conninfo(sslrootcert=str(big_bundle)), cache)
    for fresh in (False, True):  # from memory, or a fresh start from the disk records
        (first, *_rest) = _fastpath.route(plan, None, libpq=160000)
        assert "narrowed" in first.trust.label
        assert "sslnegotiation" not in first.params
        assert not first.learned_direct
        (first, *_rest) = _fastpath.route(plan, None, libpq=170000)
        assert first.params.get("sslnegotiation") == "direct"
        if not fresh:
            wait_for_threads()
            _fastpath.clear_memory()


def test_psycopg2_falls_back_when_a_host_stops_taking_direct_tls(
    server: PostgresServer, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if psycopg2.extensions.libpq_version() < 170000 or not _fastpath.libpq_has_direct():
        pytest.skip("a libpq without sslnegotiation")
    if server.major_version >= 17:
        pytest.skip("the session's server takes direct TLS")
    _learned_direct(server.conninfo(), cache)
    with caplog.at_level(logging.INFO, logger="safepg"):
        conn = safepg.psycopg2.connect(server.conninfo())
    try:
        assert conn.get_dsn_parameters().get("sslnegotiation", "postgres") == "postgres"
    finally:
        conn.close()
    assert "refused direct TLS" in caplog.text
    assert [json.loads(p.read_text())["direct_tls"] for p in cache.glob("host-*.json")] == [False]


class _Where:
    """A session as psycopg2 reports it: host and port, no address."""

    def __init__(self, host: str, port: str) -> None:
        self.host, self.port = host, port

    def where(self) -> tuple[str, str | None, str]:
        return self.host, None, self.port

    def server_version(self) -> int:
        return 160000

    def chain(self) -> None:
        return None


def test_a_landing_that_cannot_be_told_counts_as_elsewhere() -> None:
    # Two targets with the same name and port (different addresses), and a driver that does
    # not say which address it used: not known to be the first host, so a narrowed plan is
    # forgotten (never kept on a guess).
    plan = _params.build_plan(
        "host=db.example.test,db.example.test hostaddr=192.0.2.1,192.0.2.2 port=5432,5432", {}
    )
    assert _fastpath._landed(plan, _Where("db.example.test", "5432")) is None
    other = _params.build_plan("host=a.example.test,b.example.test port=5432,5433", {})
    assert _fastpath._landed(other, _Where("b.example.test", "5433")) == 1
    ports = _params.build_plan("host=a.example.test,a.example.test port=5432,5433", {})
    assert _fastpath._landed(ports, _Where("a.example.test", "5433")) == 1
    # Targets with addresses, and a driver that reports none: told apart by name and port.
    addressed = _params.build_plan(
        "host=a.example.test,b.example.test hostaddr=192.0.2.1,192.0.2.2 port=5432,5432", {}
    )
    assert _fastpath._landed(addressed, _Where("b.example.test", "5432")) == 1


def test_a_narrowed_connect_that_landed_on_another_host_forgets_what_was_learned(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    # Both hosts of a multi-host plan learned; the narrowed attempt then lands on the second
    # (the first failed, perhaps only because its anchors changed, and libpq moved on without
    # a word): what was learned is forgotten, and the next connect tries the full set.
    plan = _params.build_plan(
        f"host=a.example.test,b.example.test port=5432,5433 sslrootcert={big_bundle}", {}
    )
    index = _fastpath._index(plan.trust.path)
    assert index is not None
    keys = _fastpath._host_keys(plan, index.digest)
    anchor = _x509.parse_pem(server.ca.cert_pem)[0].sha256
    learned = [_fastpath._Learned((anchor,)) for _ in keys]
    assert _fastpath._build(plan, keys, index, learned, 180000) is not None
    route = _fastpath.route(plan, libpq=180000)
    assert next(iter(route)) is not plan  # the narrowed attempt
    route.verified(_Where("a.example.test", "5432"))  # the first host: what was learned stays
    assert _fastpath.cached(plan, 180000) is not None
    route = _fastpath.route(plan, libpq=180000)
    assert next(iter(route)) is not plan
    route.verified(_Where("b.example.test", "5433"))
    assert _fastpath.cached(plan, 180000) is None


class _Version(_Where):
    def __init__(self, host: str, port: str, version: int) -> None:
        super().__init__(host, port)
        self.version = version

    def server_version(self) -> int:
        return self.version


@pytest.mark.parametrize(("version", "direct"), [(160006, False), (170000, True), (180001, True)])
def test_direct_tls_is_learned_from_the_server_version(
    big_bundle: Path, cache: Path, server: PostgresServer, version: int, direct: bool
) -> None:
    # A host learned without knowing whether it takes direct TLS (a psycopg2 probe taught it):
    # the next verified session says, by its server version (PostgreSQL 17.0 and later).
    plan = _params.build_plan(f"host=a.example.test port=5432 sslrootcert={big_bundle}", {})
    index = _fastpath._index(plan.trust.path)
    assert index is not None
    keys = _fastpath._host_keys(plan, index.digest)
    anchor = _x509.parse_pem(server.ca.cert_pem)[0].sha256
    _fastpath._write_entry(keys[0], _fastpath._Learned((anchor,)))
    assert _fastpath._build(plan, keys, index, [_fastpath._Learned((anchor,))], 180000)
    route = _fastpath.route(plan, libpq=180000)
    assert next(iter(route)).direct_unknown
    learn = route.verified(_Version("a.example.test", "5432", version))
    assert learn is not None
    learn(1.0)
    entry = _fastpath._read_entry(keys[0], None)
    assert entry is not None
    assert entry.direct is direct


@pytest.mark.parametrize(("version", "direct"), [(169999, False), (170000, True)])
def test_direct_tls_is_learned_with_the_chain_from_the_server_version(
    server: PostgresServer, big_bundle: Path, cache: Path, version: int, direct: bool
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    plan = _params.build_plan(conninfo, {})
    with psycopg.connect(safepg.secure_conninfo(conninfo)) as conn:
        chain = _fastpath.PsycopgSession(conn.pgconn).chain()
    assert chain
    _fastpath.learn_from_session(plan, 0, chain, version, 1.0, 180000)
    index = _fastpath._index(plan.trust.path)
    assert index is not None
    entry = _fastpath._read_entry(_fastpath._host_keys(plan, index.digest)[0], index)
    assert entry is not None
    assert entry.direct is direct


# -- fresh processes start warm ------------------------------------------------------------------


def fresh_process() -> None:
    """What a new process knows: nothing in memory, the disk cache only."""
    _fastpath.clear_memory()
    _trust._valid_files.clear()
    _x509.read_certificates.cache_clear()


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        yield caplog


def test_a_fresh_process_connects_warm_without_parsing_the_set(
    server: PostgresServer,
    big_bundle: Path,
    cache: Path,
    debug_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = warm(conninfo)
    fresh_process()
    parsed: list[str] = []
    caller = threading.get_ident()
    read = _x509.read_certificates.__wrapped__

    def spy(data: bytes) -> object:
        if threading.get_ident() == caller:
            parsed.append("on the connect's thread")
        return read(data)

    monkeypatch.setattr(_x509, "read_certificates", spy)
    debug_log.clear()
    assert learned(conninfo) == small
    assert parsed == []  # neither the CA file check nor the fast path parsed the set
    assert "a fresh start" in debug_log.text
    wait_for_threads()
    assert "does not match" not in debug_log.text  # checked in the background, and kept
    assert str(big_bundle) in _fastpath._indexes
    assert learned(conninfo) == small


def test_a_fresh_process_in_another_interpreter_starts_warm(
    server: PostgresServer, big_bundle: Path, cache: Path
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = warm(conninfo)
    code = (
        "import sys, logging, safepg\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "with safepg.connect(sys.argv[1]) as c:\n"
        "    print(safepg.check(c).trust.path)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, conninfo],
        env=os.environ, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == small.path
    assert "a fresh start" in out.stderr


def test_a_fresh_process_does_not_start_warm_when_the_set_changed(
    server: PostgresServer,
    big_bundle: Path,
    tmp_path: Path,
    cache: Path,
    debug_log: pytest.LogCaptureFixture,
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    warm(conninfo)
    with bundle.open("ab") as f:  # another root added: a new stat key, a new set
        f.write(CertificateAuthority("added later").cert_pem)
    fresh_process()
    debug_log.clear()
    assert learned(conninfo).path == str(bundle)  # the full set, learned again
    assert "a fresh start" not in debug_log.text


def change_behind_an_unchanged_stat(bundle: Path) -> None:
    """Change a root of *bundle* in place, keeping its inode, size and mtime."""
    before = os.stat(bundle)
    data = bytearray(bundle.read_bytes())
    last = data.rindex(b"-----END CERTIFICATE-----")
    data[last - 10] = ord("A") if data[last - 10] != ord("A") else ord("B")  # a root changed
    with bundle.open("r+b") as f:
        f.write(bytes(data))
    os.utime(bundle, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(bundle)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_a_set_changed_behind_an_unchanged_stat_is_caught_in_the_background(
    server: PostgresServer,
    big_bundle: Path,
    tmp_path: Path,
    cache: Path,
    debug_log: pytest.LogCaptureFixture,
) -> None:
    # The same inode, size and mtime, another content: the fresh start trusts the stat key as a
    # process that parsed the set does, and the background check then finds the change.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(server.ca.cert_pem + big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    small = warm(conninfo)
    change_behind_an_unchanged_stat(bundle)
    fresh_process()
    debug_log.clear()
    assert learned(conninfo) == small  # the small file: its anchors verify the server
    wait_for_threads()
    assert "does not match the trust set" in debug_log.text
    assert list(cache.glob("host-*.json")) == []
    assert list(cache.glob("plan-*.json")) == []
    assert learned(conninfo).path == str(bundle)  # the full set from now on


def forge_digest(conninfo: str, cache: Path, record_path: Path, digest: str) -> Path:
    """Rewrite the trust record, the host entry and the plan record for *digest*, each where
    safepg would look for it (the names depend on the digest); the plan record's new path."""
    plan = _params.build_plan(conninfo, {})
    [trust_record] = cache.glob("trust-*.json")
    data = json.loads(trust_record.read_text())
    data["digest"] = digest
    trust_record.write_text(json.dumps(data))
    keys = _fastpath._host_keys(plan, digest)
    [entry_path] = cache.glob("host-*.json")
    entry = json.loads(entry_path.read_text())
    entry["trust_digest"] = digest
    (cache / keys[0].filename()).write_text(json.dumps(entry))
    record = json.loads(record_path.read_text())
    record["hosts"] = [k.filename() for k in keys]
    record_path.unlink()
    record_path = cache / _fastpath._plan_record_name(keys)
    record_path.write_text(json.dumps(record))
    for path in (cache / keys[0].filename(), record_path):
        path.chmod(0o600)
    return record_path


@pytest.mark.parametrize(
    "tamper",
    [
        "anchors",
        "file",
        "no file",
        "sha256",
        "no sha256",
        "hosts",
        "small file",
        "host entry",
        "host entry of another host",
        "trust record path",
        "a digest that is no SHA-256",
    ],
)
def test_a_tampered_record_is_not_a_fresh_start(
    server: PostgresServer,
    big_bundle: Path,
    rogue_ca: CertificateAuthority,
    cache: Path,
    tamper: str,
    debug_log: pytest.LogCaptureFixture,
) -> None:
    conninfo = server.conninfo(sslrootcert=str(big_bundle))
    small = warm(conninfo)
    (record_path,) = cache.glob("plan-*.json")
    record = json.loads(record_path.read_text())
    rogue = _x509.parse_pem(rogue_ca.cert_pem)[0].sha256
    if tamper == "anchors":
        record["anchors"] = sorted([*record["anchors"], rogue])
    elif tamper == "file":
        record["file"] = "../" + record["file"]
    elif tamper == "no file":  # "the whole set was learned", but with a digest of a file
        record["file"] = None
    elif tamper == "sha256":
        record["sha256"] = "0" * 64
    elif tamper == "no sha256":
        record["sha256"] = None
    elif tamper == "hosts":
        record["hosts"] = ["host-" + "0" * 32 + ".json"]
    elif tamper == "host entry of another host":  # the right file name, another host inside
        for entry_path in cache.glob("host-*.json"):
            entry = json.loads(entry_path.read_text())
            entry["host"] = "elsewhere.example.test"
            entry_path.write_text(json.dumps(entry))
    elif tamper == "a digest that is no SHA-256":  # every record forged consistently with it
        record_path = forge_digest(conninfo, cache, record_path, "not-a-digest")
        record = json.loads(record_path.read_text())
    elif tamper == "host entry":  # not JSON that holds an entry
        for entry in cache.glob("host-*.json"):
            entry.write_text('{"version": 1, "host": ["not", "a", "str"], "anchors": 7}')
    elif tamper == "trust record path":  # a record made for another file
        (trust_record,) = cache.glob("trust-*.json")
        data = json.loads(trust_record.read_text())
        data["path"] = str(big_bundle) + ".other"
        trust_record.write_text(json.dumps(data))
    else:
        with Path(small.path).open("ab") as f:
            f.write(rogue_ca.cert_pem)
    record_path.write_text(json.dumps(record))
    fresh_process()
    debug_log.clear()
    trust = learned(conninfo)
    assert "a fresh start" not in debug_log.text
    assert rogue not in fingerprints(trust.path)
    assert fingerprints(trust.path) <= fingerprints(big_bundle)


def test_the_ca_file_check_is_recorded_by_stat(
    server: PostgresServer, second_ca: CertificateAuthority, tmp_path: Path, cache: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(server.ca.cert_pem + second_ca.cert_pem)
    learned(server.conninfo(sslrootcert=str(ca)))  # recorded once the host is learned
    assert list(cache.glob("ca-*.json"))
    fresh_process()
    ca.write_bytes(b"not a certificate, and a new stat key\n")
    with pytest.raises(safepg.ConfigurationError, match="holds no PEM certificate"):
        safepg.connect(server.conninfo(sslrootcert=str(ca)))


# -- plans remembered per input (_plans) ---------------------------------------------------------


@pytest.fixture
def remembering(caplog: pytest.LogCaptureFixture) -> None:
    """Plans are remembered only while safepg's debug messages are off (the suite turns them on
    for every test, to check that no password reaches them)."""
    caplog.set_level(logging.INFO, logger="safepg")


def test_a_remembered_plan_follows_the_environment(
    server: PostgresServer,
    second_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    remembering: None,
) -> None:
    from safepg import _plans

    conninfo = server.conninfo(sslrootcert=None)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    assert learned(conninfo).path == str(server.ca_path)
    assert learned(conninfo).path == str(server.ca_path)
    assert len(_plans._memo) == 1  # remembered
    other = tmp_path / "other.pem"
    other.write_bytes(server.ca.cert_pem + second_ca.cert_pem)
    monkeypatch.setenv("PGSSLROOTCERT", str(other))  # the environment changed: built again
    assert learned(conninfo).path.startswith((str(other), str(tmp_path / "cache")))
    assert learned(conninfo).origin == "PGSSLROOTCERT"


def test_a_plan_built_while_the_environment_changed_is_not_remembered(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, remembering: None
) -> None:
    """Another thread changes os.environ while a plan is built: the plan may mix both
    environments, so it is not remembered, even once the environment is back as it was."""
    from safepg import _plans

    conninfo = server.conninfo()
    built: list[_params.Plan] = []
    build = _params.build_plan

    def changing(*args: object, **kwargs: object) -> _params.Plan:
        plan = build(*args, **kwargs)  # type: ignore[arg-type]
        built.append(plan)
        monkeypatch.setenv("PGAPPNAME", "changed meanwhile")
        return plan

    monkeypatch.setattr("safepg._plans.build_plan", changing)
    _plans.plan_for(conninfo, {})
    monkeypatch.delenv("PGAPPNAME")  # back as it was when the build started
    _plans.plan_for(conninfo, {})
    assert len(built) == 2
    assert not _plans._memo


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing user needs root"
)
def test_a_remembered_plan_is_not_used_by_another_user(
    server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    remembering: None,
    world: Path,  # noqa: F811 - the fixture
) -> None:
    """A process that drops privileges (or a worker forked by a root service) resolves
    libpq's files in another home: the plan is built again for it."""
    from safepg import _plans

    from .test_guarantees import NOBODY

    ca = world / "ca.pem"  # a CA file both users can read: only the user differs
    ca.write_bytes(server.ca.cert_pem)
    ca.chmod(0o644)
    conninfo = server.conninfo(sslrootcert=str(ca))
    _plans.plan_for(conninfo, {})
    assert len(_plans._memo) == 1
    built: list[None] = []
    build = _params.build_plan

    def counting(*args: object, **kwargs: object) -> _params.Plan:
        built.append(None)
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("safepg._plans.build_plan", counting)

    def as_nobody() -> int:
        os.seteuid(NOBODY)
        with contextlib.suppress(Exception):  # nobody may not read the test's CA file
            _plans.plan_for(conninfo, {})
        return len(built)

    assert in_child(as_nobody) == 1
    _plans.plan_for(conninfo, {})
    assert built == []  # the parent's own plan is still remembered


def test_a_remembered_plan_follows_the_trust_file(
    server: PostgresServer, tmp_path: Path, clean_env: Path, remembering: None
) -> None:
    from safepg import _plans

    ca = tmp_path / "ca.pem"
    ca.write_bytes(server.ca.cert_pem)
    conninfo = server.conninfo(sslrootcert=str(ca))
    learned(conninfo)
    learned(conninfo)
    assert len(_plans._memo) == 1
    ca.write_bytes(b"no certificate here any more\n")  # a new stat key: checked again
    with pytest.raises(safepg.ConfigurationError, match="holds no PEM certificate"):
        safepg.connect(conninfo)
    # libpq's default file appearing changes what an unnamed set resolves to.
    monkeypatch_free = server.conninfo(sslrootcert=None)
    for _ in range(2):  # remembered the second time
        with pytest.raises(safepg.UntrustedCertificateError):
            safepg.connect(monkeypatch_free)  # the OS store/certifi: not the test CA
    root = clean_env / ".postgresql" / "root.crt"
    root.parent.mkdir()
    root.write_bytes(server.ca.cert_pem)
    assert learned(monkeypatch_free).path == str(root)


def test_a_remembered_plan_keeps_no_keyword_password(
    server: PostgresServer, remembering: None
) -> None:
    from safepg import _plans

    conninfo = server.conninfo(sslrootcert=str(server.ca_path), password=None)
    password = server.password
    for _ in range(2):
        with safepg.connect(conninfo, password=password) as conn:
            assert safepg.check(conn).verified
    assert _plans._memo
    assert all("password" not in plan.params for plan, *_ in _plans._memo.values())
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        safepg.connect(conninfo, password="not the password")  # the new value reaches libpq
    with pytest.raises(safepg.ConfigurationError, match="NUL byte"):
        safepg.connect(conninfo, password="bad\x00value")  # and is checked as build_plan does


@pytest.mark.parametrize(
    "host",
    ["db.example.com", "db.example.com.", "a" * 63 + ".x", "a" * 64 + ".x", "x." + "a" * 64,
     "x." + "a" * 63, "a..b", ".a", "", ".", "127.0.0.1", "::1", "fe80::1%eth0", "-a-.b"],
)  # fmt: skip
def test_ascii_host_names_are_checked_as_the_idna_codec_checks_them(host: str) -> None:
    try:
        host.encode("idna")
        codec = True
    except UnicodeError:
        codec = False
    assert _params._idna_ok(host) is codec


def test_a_remembered_plan_checks_its_revocation_lists_again(
    server: PostgresServer,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    clean_env: Path,
    remembering: None,
) -> None:
    # libpq trusts certificates it finds in a CRL file: one that gains a certificate after the
    # plan was remembered, or a default root.crl that appears, is refused all the same.
    from safepg import _plans

    from .test_driver_policy import write_crl

    crl = write_crl(tmp_path / "server.crl", server.ca)
    conninfo = server.conninfo(sslcrl=str(crl))
    for _ in range(2):
        safepg.connect(conninfo).close()
    assert len(_plans._memo) == 1  # remembered
    crl.write_bytes(crl.read_bytes() + rogue_ca.cert_pem)
    with pytest.raises(safepg.ConfigurationError, match="must hold PEM CRLs"):
        safepg.connect(conninfo)
    plain = server.conninfo()
    for _ in range(2):
        safepg.connect(plain).close()
    default = clean_env / ".postgresql" / "root.crl"
    default.parent.mkdir()
    default.write_bytes(crl.read_bytes())
    with pytest.raises(safepg.ConfigurationError, match="must hold PEM CRLs"):
        safepg.connect(plain)


# -- decisions of _plans the mutation stage showed untested (mutation/RESULTS.md) -------------


def test_a_remembered_plan_is_used_and_keyed_without_secrets(
    server: PostgresServer, remembering: None
) -> None:
    from safepg import _plans

    _plans.clear_memory()
    conninfo = f"host=db.example.com sslrootcert={server.ca_path}"
    _plans.plan_for(conninfo, {})
    first = _plans.plan_for(conninfo, {})
    assert _plans.plan_for(conninfo, {}) is first  # remembered: not built again
    # A keyword given as None is no keyword: the same input, the same plan.
    assert _plans.plan_for(conninfo, {"sslcert": None}) is first
    # The socket opt-in is part of the input: a plan without it never serves a call with it.
    _plans.plan_for(conninfo, {}, allow_unencrypted_unix_socket=True)
    allowed = _plans.plan_for(conninfo, {}, allow_unencrypted_unix_socket=True)
    assert allowed.allow_unix_socket
    assert not first.allow_unix_socket
    assert _plans.plan_for(conninfo, {}, allow_unencrypted_unix_socket=True) is allowed
    # Not a bool ("yes" from a settings file): built each time, as build_plan reads it.
    assert _plans.plan_for(conninfo, {}, allow_unencrypted_unix_socket="yes").allow_unix_socket
    assert not _plans.plan_for(conninfo, {}).allow_unix_socket  # and never remembered as False
    # A keyword password is in neither the remembered plan nor the key it is kept under.
    secret = "s3cr3t-in-no-key"
    with_password = _plans.plan_for(conninfo, {"password": secret})
    assert with_password.params["password"] == secret
    assert _plans.plan_for(conninfo, {"password": secret}).params["password"] == secret
    assert secret not in repr(list(_plans._memo.items()))


def test_remembered_plans_follow_the_keywords_and_are_bounded(
    server: PostgresServer, tmp_path: Path, remembering: None
) -> None:
    from safepg import _plans

    _plans.clear_memory()
    other = tmp_path / "other.pem"
    other.write_bytes(server.ca.cert_pem)
    for _ in range(2):  # the second time from memory
        for ca in (str(server.ca_path), str(other)):
            plan = _plans.plan_for("host=db.example.com", {"sslrootcert": ca})
            assert plan.trust.path == ca
    for n in range(_plans._MAX + 5):
        _plans.plan_for(f"host=db{n}.example.com sslrootcert={server.ca_path}", {})
    assert len(_plans._memo) == _plans._MAX
    _plans.clear_memory()


def test_remembered_plans_are_evicted_least_recently_used_first(
    server: PostgresServer, remembering: None
) -> None:
    from safepg import _plans

    _plans.clear_memory()

    def conninfo(n: int) -> str:
        return f"host=db{n}.example.com sslrootcert={server.ca_path}"

    for n in range(_plans._MAX):
        _plans.plan_for(conninfo(n), {})
    kept = _plans.plan_for(conninfo(0), {})  # used again: now the most recent
    _plans.plan_for(conninfo(_plans._MAX), {})  # one more: db1 goes, not db0
    assert len(_plans._memo) == _plans._MAX
    assert _plans.plan_for(conninfo(0), {}) is kept
    newest = _plans.plan_for(conninfo(_plans._MAX), {})
    assert _plans.plan_for(conninfo(_plans._MAX), {}) is newest
    assert not any(key[0] == conninfo(1) for key in _plans._memo)
    _plans.clear_memory()


@pytest.mark.parametrize("named_by", ["conninfo", "PGSERVICE"])
def test_a_plan_from_a_service_file_is_not_remembered(
    server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    remembering: None,
    named_by: str,
) -> None:
    # libpq reads the service file again on each connect: a remembered plan would keep what
    # the file said when it was made.
    from safepg import _plans

    _plans.clear_memory()
    services = tmp_path / "services.conf"
    services.write_text(f"[app]\nhost=db.example.com\nsslrootcert={server.ca_path}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    conninfo = "service=app"
    if named_by == "PGSERVICE":
        monkeypatch.setenv("PGSERVICE", "app")
        conninfo = ""  # libpq 15 does not report such a service among its options
    for _ in range(2):
        assert _plans.plan_for(conninfo, {}).targets[0].host == "db.example.com"
    assert not _plans._memo
    services.write_text(f"[app]\nhost=other.example.com\nsslrootcert={server.ca_path}\n")
    assert _plans.plan_for(conninfo, {}).targets[0].host == "other.example.com"


def test_plans_with_verify_as_or_a_providers_bundle_are_not_remembered(
    server: PostgresServer, remembering: None
) -> None:
    # verify_as resolves the alias on each call (a DNS lookup), and is not part of the key: a
    # remembered plan would verify the alias's name for a call that did not ask for it. A
    # provider's bundle may be refreshed.
    from safepg import _plans

    _plans.clear_memory()
    conninfo = f"host=127.0.0.1 sslrootcert={server.ca_path}"
    for _ in range(2):
        aliased = _plans.plan_for(conninfo, {}, verify_as="localhost")
        assert aliased.targets[0].host == "localhost"
    assert not _plans._memo
    plain = _plans.plan_for(conninfo, {})
    assert plain.targets[0].host == "127.0.0.1"
    assert plain.targets[0].hostaddr is None
    _plans.clear_memory()
    for _ in range(2):
        bundled = _plans.plan_for("host=mydb.abc123.eu-west-1.rds.amazonaws.com", {})
        assert bundled.trust.origin == "bundled"
    assert not _plans._memo


# -- every fresh start is checked: a second host, a forked child, no thread to check with -------


def tamper_with(
    cache: Path, host: Path, plan: Path, small: Path, rogue: CertificateAuthority
) -> str:
    """Add *rogue* to one host's records, consistently: the host entry's anchors, a small file
    that holds it too, and the plan record naming that file (what the check is there for)."""
    fingerprint = _x509.parse_pem(rogue.cert_pem)[0].sha256
    entry = json.loads(host.read_text())
    entry["anchors"] = sorted([*entry["anchors"], fingerprint])
    host.write_text(json.dumps(entry))
    pem = small.read_bytes() + rogue.cert_pem
    tampered = _cache.write_trust_file("anchors", pem)
    record = json.loads(plan.read_text())
    record.update(
        anchors=entry["anchors"], file=tampered.name, sha256=hashlib.sha256(pem).hexdigest()
    )
    plan.write_text(json.dumps(record))
    return fingerprint


def test_every_host_of_a_fresh_start_is_checked(
    server: PostgresServer,
    tmp_path: Path,
    cache: Path,
    rogue_ca: CertificateAuthority,
    certs: CertificateShop,
) -> None:
    """Two hosts of one trust set start fresh within the first check's delay (a primary and a
    replica at start-up): each host's records are checked, not only the first's."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        server.ca.cert_pem
        + CertificateAuthority("another root").cert_pem
        + CertificateAuthority("a third root").cert_pem
    )
    a = server.conninfo(sslrootcert=str(bundle))
    b = server.conninfo(sslrootcert=str(bundle), host="localhost", hostaddr="127.0.0.1")
    warm(a)
    hosts, plans = set(cache.glob("host-*.json")), set(cache.glob("plan-*.json"))
    small_b = warm(b)
    [host_b] = set(cache.glob("host-*.json")) - hosts
    [plan_b] = set(cache.glob("plan-*.json")) - plans
    rogue = tamper_with(cache, host_b, plan_b, Path(small_b.path), rogue_ca)
    fresh_process()
    learned(a)  # A's check starts (after its delay)
    learned(b)  # B's fresh start, within that delay
    wait_for_threads()
    assert rogue not in fingerprints(learned(b).path)
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)  # a man in the middle
    for conninfo in (a, b):
        with pytest.raises(safepg.UntrustedCertificateError):
            safepg.connect(conninfo)


def test_a_forked_child_does_not_use_what_its_parent_had_not_checked(
    server: PostgresServer, big_bundle: Path, tmp_path: Path, cache: Path
) -> None:
    """A process starts fresh, connects, and forks before its check has run (gunicorn
    --preload): the child has no check thread, so it forgets what was not checked, reads the
    disk again and checks what it uses itself."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(server.ca.cert_pem + big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    small = warm(conninfo)
    change_behind_an_unchanged_stat(bundle)
    fresh_process()
    assert learned(conninfo) == small  # checked later, in a thread (after a delay)

    def child_connects() -> list[str]:
        first = learned(conninfo).path
        assert _fastpath.checks_done(30)
        return [first, learned(conninfo).path]

    child = in_child(child_connects)
    wait_for_threads()
    assert isinstance(child, list)
    # The child's first connect may start from the records (as its parent's did); its own
    # check then finds the change, and the full set is used from then on.
    assert child[1] == str(bundle)


def test_a_check_that_cannot_start_forgets_what_it_would_have_checked(
    server: PostgresServer, big_bundle: Path, tmp_path: Path, cache: Path
) -> None:
    """No thread can be started (a thread limit, no memory): the connect that libpq verified
    is returned, and the records it started from are forgotten, not kept unchecked."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(server.ca.cert_pem + big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    small = warm(conninfo)
    change_behind_an_unchanged_stat(bundle)
    fresh_process()
    old = threading.stack_size(1 << 40)  # no thread can be made with that stack
    try:
        assert learned(conninfo) == small  # a session libpq verified: returned
    finally:
        threading.stack_size(old)
    assert _fastpath.checks_done(1)
    assert list(cache.glob("plan-*.json")) == []
    assert learned(conninfo).path == str(bundle)  # the full set, parsed in this process


def test_a_second_fresh_start_of_the_same_hosts_during_a_check_is_checked_too(
    server: PostgresServer,
    tmp_path: Path,
    cache: Path,
    rogue_ca: CertificateAuthority,
    certs: CertificateShop,
) -> None:
    """A fresh process connects (records R1, sound): its check is queued. Before it runs (it
    waits for another set's check, or its delay), the records on disk change to R2 (a rogue
    anchor added, consistently). The next connect starts fresh again from R2: that is a check
    of its own, not covered by R1's (found by the attacker review)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        server.ca.cert_pem
        + CertificateAuthority("another root").cert_pem
        + CertificateAuthority("a third root").cert_pem
    )
    conninfo = server.conninfo(sslrootcert=str(bundle))
    small = warm(conninfo)
    [host] = cache.glob("host-*.json")
    [plan] = cache.glob("plan-*.json")
    fresh_process()
    # Another check (of another trust set, a large one) holds the lock for a while.
    with _fastpath._check_lock:
        assert learned(conninfo) == small  # fresh start from R1; its check is waiting
        rogue = tamper_with(cache, host, plan, Path(small.path), rogue_ca)  # R2 on disk
        os.utime(small.path, ns=(1, 1))  # the small file R1 named changed: memo invalid
        used = learned(conninfo)  # fresh start again, from R2
        assert rogue in fingerprints(used.path)
    wait_for_threads()
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)  # a man in the middle
    try:
        with pytest.raises(safepg.UntrustedCertificateError):
            safepg.connect(conninfo).close()
    finally:
        certs.present("localhost", ip_addresses=["127.0.0.1"])
    assert rogue not in fingerprints(learned(conninfo).path)  # R2's check caught it


def test_a_fork_while_another_thread_starts_fresh_forgets_its_records_in_the_child(
    server: PostgresServer, big_bundle: Path, tmp_path: Path, cache: Path
) -> None:
    """Thread A starts fresh (`_warm_start`) while the main thread forks (a multiprocessing
    worker, a pre-fork server) at the moment A has put the records in memory: the child
    forgets them too, and checks what it uses itself (found by the attacker review)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(server.ca.cert_pem + big_bundle.read_bytes())
    conninfo = server.conninfo(sslrootcert=str(bundle))
    warm(conninfo)
    change_behind_an_unchanged_stat(bundle)  # what the check would catch
    fresh_process()

    at_window, forked = threading.Event(), threading.Event()
    parent = os.getpid()

    class Pause(logging.Handler):  # stands for thread A being preempted at this line
        def emit(self, record: logging.LogRecord) -> None:
            if os.getpid() == parent and "a fresh start" in record.getMessage():
                at_window.set()
                forked.wait(10)

    handler = Pause(logging.DEBUG)
    log = logging.getLogger("safepg")
    old = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        a = threading.Thread(target=lambda: learned(conninfo))
        a.start()
        assert at_window.wait(10)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                first = learned(conninfo).path
                ok = _fastpath.checks_done(30)
                os.write(write, json.dumps([first, ok, learned(conninfo).path]).encode())
            finally:
                os._exit(0)
        forked.set()
        a.join(30)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = json.loads(pipe.read() or b"null")
    os.waitpid(pid, 0)
    wait_for_threads()
    assert child is not None
    # As in tests/test_route.py's forked-child test: the child must end on the full set.
    assert child[2] == str(bundle)
