"""Security decisions that a careless refactor could break without any other test noticing.

Each test here was written against a mutant: the decision removed or inverted, one at a time
(see mutation/RESULTS.md). Each fails on that mutant and passes on the code as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import ssl
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import certifi
import psycopg
import pytest

import safepg
from safepg import ConfigurationError, InsecureConnectionError, _cache, _check, _fastpath, _params
from safepg._cli import main
from safepg._password import ConnectTarget
from safepg._redact import redact
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

# -- the cache's chain of directories: owner and group-writable checks --------------------------

NOBODY = 65534
OTHER = 64999  # a user id nobody on this machine has: "another user"

needs_root = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0,
    reason="making directories of other users and running as another user needs root",
)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every user can reach (tmp_path's parents are root's, mode 0700).

    Made with mkdtemp next to pytest's own directories and removed afterwards: the user
    ``nobody`` must be able to walk to it from ``/``.
    """
    base = Path(tempfile.mkdtemp(prefix="safepg-guarantees-"))
    try:
        base.chmod(0o755)
        yield Path(os.path.realpath(base))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def in_child(fn: Callable[[], object]) -> object:
    """Run *fn* in a forked child and return its result (JSON); an error in the child fails
    the test with its repr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            result: object = fn()
        except BaseException as ex:  # reported to the parent
            result, code = {"error": repr(ex)}, 1
        with contextlib.suppress(BaseException):
            os.write(write, json.dumps(result).encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return json.loads(data)


def as_user(uid: int, fn: Callable[[], object]) -> object:
    """Run *fn* in a forked child whose real and effective user is *uid*; return its result."""

    def run() -> object:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        return fn()

    return in_child(run)


def make(path: Path, mode: int, uid: int = 0) -> Path:
    path.mkdir()
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@needs_root
def test_owner_check_as_another_user(world: Path) -> None:
    """As ``nobody``: the cache must be its own; above it, root's or its own, nobody else's."""
    mine = make(world / "mine", 0o700, NOBODY)
    roots = make(world / "roots", 0o755)
    other = make(world / "other", 0o755, OTHER)
    under_other = make(other / "cache", 0o700, NOBODY)
    under_root = make(roots / "cache", 0o700, NOBODY)
    sticky = make(world / "sticky", 0o1777, NOBODY)  # sticky, but not root's
    under_sticky = make(sticky / "cache", 0o700, NOBODY)
    hidden = make(world / "hidden", 0o700)  # root's, closed: nobody cannot look inside

    def look() -> dict[str, Any]:
        assert os.geteuid() == NOBODY
        return {
            "mine": _cache.chain_problem(str(mine)),
            "under_root": _cache.chain_problem(str(under_root)),
            "roots": _cache.chain_problem(str(roots)),
            "roots_may_own": _cache.chain_problem(str(roots), root_may_own=True),
            "under_other": _cache.chain_problem(str(under_other)),
            "other": _cache.chain_problem(str(other), root_may_own=True),
            "under_sticky": _cache.chain_problem(str(under_sticky)),
            "hidden": _cache.chain_problem(str(hidden / "cache")),
        }

    found = as_user(NOBODY, look)
    assert isinstance(found, dict)
    assert found["mine"] is None
    assert found["under_root"] is None  # root's directories above it are fine
    assert found["roots_may_own"] is None
    # The cache itself belongs to root: refused unless the caller allows it (trust files).
    assert f"{roots} belongs to another user (uid 0)" in found["roots"]
    # A directory of a third user above the cache: that user could swap the cache.
    assert f"{other} belongs to another user (uid {OTHER})" in found["under_other"]
    assert f"{other} belongs to another user (uid {OTHER})" in found["other"]
    # The sticky bit protects only in root's directories: its owner may rename anything.
    assert f"{sticky} can be written by other users" in found["under_sticky"]
    assert f"{hidden / 'cache'} cannot be checked" in found["hidden"]


@needs_root
def test_cache_under_another_users_directory_is_refused(world: Path) -> None:
    other = make(world / "other", 0o755, OTHER)
    with pytest.raises(ConfigurationError, match=f"belongs to another user .uid {OTHER}."):
        _cache.private_dir(other / "safepg")
    # The same place, once it is root's (this user's): accepted.
    os.chown(other, 0, 0)
    assert _cache.private_dir(other / "safepg") == other / "safepg"


@needs_root
@pytest.mark.parametrize("mode", [0o770, 0o730, 0o707])
def test_cache_under_a_directory_others_can_write_is_refused(world: Path, mode: int) -> None:
    """Group-writable is as bad as world-writable (the suite elsewhere only tries 0777)."""
    parent = make(world / "parent", mode)
    with pytest.raises(ConfigurationError, match="can be written by other users") as info:
        _cache.private_dir(parent / "safepg")
    assert f"{parent} can be written" in str(info.value)


@needs_root
def test_sticky_directory_of_roots_is_accepted_above_the_cache_only(world: Path) -> None:
    shared = make(world / "shared", 0o1777)  # /tmp's kind
    assert _cache.private_dir(shared / "safepg") == shared / "safepg"
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        _cache.private_dir(shared)  # never as the cache itself


@needs_root
@pytest.mark.parametrize("mode", [0o720, 0o702, 0o1770])
def test_a_cache_directory_others_can_write_is_refused(world: Path, mode: int) -> None:
    cache = make(world / "safepg", mode)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        _cache.private_dir(cache)


# -- redaction ---------------------------------------------------------------------------------


def test_redact_masks_each_listed_secret_wherever_it_appears() -> None:
    # Nothing marks these as passwords but the list: no "password=", no URL user-info.
    text = "server said: token eyJ0eXAi.abc rejected; retry with eyJ0eXAi.abc or s3cr"
    out = redact(text, ["eyJ0eXAi.abc", None, "s3cr"])
    assert "eyJ0eXAi" not in out
    assert "s3cr" not in out  # four characters: long enough to be looked for
    assert out == "server said: token *** rejected; retry with *** or ***"
    # Three characters are too short to be searched for in free text (the message would be
    # garbled), but are still masked after password=.
    assert redact("abc password=abc", ["abc"]) == "abc password=***"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sslpassword=hunter2 host=db", "sslpassword=*** host=db"),
        ("host=db sslpassword = 'hun ter2' x=1", "host=db sslpassword = *** x=1"),
        (
            "postgresql://db/app?sslpassword=hunter2&user=u",
            "postgresql://db/app?sslpassword=***&user=u",
        ),
        ("SSLPASSWORD=hunter2", "SSLPASSWORD=***"),
        ("postgresql://u:hunter2@db/app", "postgresql://u:***@db/app"),
    ],
)
def test_redact_masks_sslpassword_in_text(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("conninfo", "kwargs", "shown", "hidden"),
    [
        # libpq quotes the fragment it choked on, which may be the password.
        ("postgresql://u:s3cr%zz@db/app", {}, "invalid percent-encoded token (the text", "s3cr"),
        ("host=db pa55 word=x", {}, "missing '=' after (the text is not shown", "pa55"),
        # An option named in a conninfo string that holds a password may be a piece of it,
        # badly quoted ("password=hun hunter2=x" meant a password with a space).
        ("host=db password=hun hunter2=x", {}, "unknown option (its name is not shown", "hunter2"),
        # With no password around, the name cannot be part of one: it is named.
        ("host=db hunter2=x", {}, 'unknown option "hunter2"', "\n"),
        # One the caller passed as a keyword argument is named: it is not a secret.
        ("host=db", {"nosuchopt": "1"}, 'unknown option "nosuchopt"', "\n"),
    ],
)
def test_libpq_parse_errors_never_quote_the_input(
    conninfo: str, kwargs: dict[str, str], shown: str, hidden: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        _params.build_plan(conninfo, kwargs)
    assert shown in str(info.value)
    assert hidden not in str(info.value)
    assert info.value.__context__ is None


def test_redact_parse_error_branches() -> None:
    from safepg._redact import redact_parse_error

    assert redact_parse_error("") == "unknown error"
    assert redact_parse_error("  \n") == "unknown error"
    assert redact_parse_error("first line\nsecond s3cret line") == "first line"
    # No quote at all: the text is kept, with password= masked all the same.
    assert redact_parse_error("bad password=s3cret here") == "bad password=*** here"
    # libpq's own quoted characters are kept (as single quotes), not taken for input.
    assert redact_parse_error('missing "=" after "s3cret" in x') == (
        "missing '=' after (the text is not shown: it may hold part of a password)"
    )
    assert redact_parse_error('unexpected "]" in "s3cret"').startswith("unexpected ']' in (")
    assert redact_parse_error('bad "?" in "s3cret"').startswith("bad '?' in (")
    assert redact_parse_error('bad "/" in "s3cret"').startswith("bad '/' in (")
    option = 'invalid connection option "s3cret"'
    assert redact_parse_error(option, ["s3cret"]).startswith('unknown option "s3cret": libpq has')
    for keywords in ((), ["other"]):
        out = redact_parse_error(option, keywords)
        assert out.startswith("unknown option (its name is not shown")
        assert "s3cret" not in out


def test_the_plan_lists_both_secrets(server: PostgresServer) -> None:
    plan = _params.build_plan(server.conninfo(sslpassword="key-pass-phrase"), {})
    assert server.password in plan.secrets
    assert "key-pass-phrase" in plan.secrets


# -- the fast path never learns a multi-host plan from a probe --------------------------------


def test_multi_host_plan_is_never_learned_by_a_probe(
    server: PostgresServer, tmp_path: Path, stalled_port: int
) -> None:
    """A probe reads an unauthenticated chain: for a multi-host plan, whose anchors decide
    which host libpq silently moves on to, only verified sessions teach."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)

    def probes_started(conninfo: str) -> int:
        plan = _params.build_plan(f"{conninfo} sslrootcert={bundle} connect_timeout=2", {})
        # The session could not be read (another TLS library): only a probe could teach.
        _fastpath.learn_from_session(plan, 0, None, server.major_version * 10000, timeout=2)
        with _fastpath._locks_guard:
            return len(_fastpath._probing)

    hosts = "host=localhost,127.0.0.1 hostaddr=127.0.0.1,127.0.0.1"
    assert probes_started(f"{hosts} port={stalled_port},{stalled_port}") == 0
    # The same for one host does probe (so the check above can see a probe).
    assert probes_started(f"host=localhost hostaddr=127.0.0.1 port={stalled_port}") == 1


# -- presented_chain: the chain OpenSSL verified, not what the server sent ---------------------


def test_presented_chain_is_the_verified_chain_not_the_sent_one(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from safepg import _libpq

    leaf = certs.present("localhost", ip_addresses=["127.0.0.1"])
    # The server sends its leaf, then a CA certificate that has nothing to do with it.
    padded = dataclasses.replace(leaf, chain=(rogue_ca.cert,))
    server.use_certificate(padded)
    rogue_der = rogue_ca.cert.public_bytes(Encoding.DER)
    sent = _probe_chain(server)
    assert rogue_der in sent  # the server does send it
    with safepg.connect(server.conninfo(), fast_path=False) as conn:
        chain = _libpq.presented_chain(conn.pgconn)
    if chain is None:
        pytest.skip("this libpq's session cannot be read (not OpenSSL)")
    assert chain == [
        leaf.cert.public_bytes(Encoding.DER),
        server.ca.cert.public_bytes(Encoding.DER),
    ]
    # So the fast path learns only the anchor that verifies, even with the rogue CA in the set.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + rogue_ca.cert_pem + server.ca.cert_pem)
    conninfo = server.conninfo(sslrootcert=str(bundle))
    for _ in range(2):
        with safepg.connect(conninfo) as conn:
            trust = safepg.check(conn).trust
    assert trust is not None
    assert trust.path != str(bundle)
    assert Path(trust.path).read_bytes().count(b"BEGIN CERTIFICATE") == 1
    assert Path(trust.path).read_bytes() == server.ca.cert_pem


def _probe_chain(server: PostgresServer) -> list[bytes]:
    from safepg import _probe

    probed = _probe.presented_chain("127.0.0.1", server.port, server_hostname=None, timeout=5)
    assert probed is not None
    return list(probed.chain)


# -- the socket opt-in never lets an unencrypted TCP session through ---------------------------


def test_socket_opt_in_does_not_pass_an_unencrypted_tcp_session(server: PostgresServer) -> None:
    plan = _params.build_plan(
        server.conninfo(host=str(server.socket_dir)), {}, allow_unencrypted_unix_socket=True
    )
    assert plan.allow_unix_socket
    with psycopg.connect(server.conninfo(sslmode="disable")) as plain:
        assert not plain.pgconn.ssl_in_use
        assert _check.session_problem(plain.pgconn, allow_socket=True) is not None
        assert _check.tls_problem(False, "127.0.0.1", allow_socket=True) is not None
        _check._plans[plain] = plan  # as if safepg had opened it, with the opt-in
        with pytest.raises(InsecureConnectionError, match="below safepg's policy"):
            safepg.check(plain)
    # The opt-in does pass a real socket session (so the refusal above is about TCP).
    with psycopg.connect(server.conninfo(host=str(server.socket_dir), sslmode="disable")) as sock:
        assert _check.session_problem(sock.pgconn, allow_socket=True) is None
        _check._plans[sock] = plan
        assert safepg.check(sock).local_socket


def test_asyncpg_socket_opt_in_does_not_pass_an_unencrypted_tcp_session(
    server: PostgresServer,
) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    import safepg.asyncpg

    plan = _params.build_plan(
        server.conninfo(host=str(server.socket_dir)), {}, allow_unencrypted_unix_socket=True
    )

    async def problem() -> str | None:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=server.port,
            user=server.user,
            password=server.password,
            database=server.dbname,
            ssl=False,
        )
        try:
            return safepg.asyncpg._session_problem(conn, plan)
        finally:
            await conn.close()

    assert asyncio.run(problem()) == "the session is not encrypted"


# -- asyncpg: a caller's context that does not check the host name -----------------------------


def test_asyncpg_session_check_refuses_a_session_without_host_name_checks(
    server: PostgresServer,
) -> None:
    """Defence in depth behind the refusal below: a live session whose context verified the
    chain but not the host name is refused by the after-connect check itself."""
    asyncpg = pytest.importorskip("asyncpg")
    import safepg.asyncpg

    plan = _params.build_plan(server.conninfo(), {})
    ctx = ssl.create_default_context(cafile=str(server.ca_path))
    ctx.check_hostname = False
    assert ctx.verify_mode == ssl.CERT_REQUIRED

    async def problems() -> tuple[str | None, str | None]:
        lax = await asyncpg.connect(
            host="127.0.0.1",
            port=server.port,
            user=server.user,
            password=server.password,
            database=server.dbname,
            ssl=ctx,
        )
        full = await asyncpg.connect(
            host="127.0.0.1",
            port=server.port,
            user=server.user,
            password=server.password,
            database=server.dbname,
            ssl=ssl.create_default_context(cafile=str(server.ca_path)),
        )
        try:
            return (
                safepg.asyncpg._session_problem(lax, plan),
                safepg.asyncpg._session_problem(full, plan),
            )
        finally:
            await lax.close()
            await full.close()

    assert asyncio.run(problems()) == ("the server's certificate was not verified", None)


def test_asyncpg_refuses_a_context_without_host_name_checks_before_connecting(
    server: PostgresServer,
) -> None:
    pytest.importorskip("asyncpg")
    import safepg.asyncpg

    ctx = ssl.create_default_context(cafile=str(server.ca_path))
    ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)

        async def attempt() -> None:
            await safepg.asyncpg.connect(
                host="127.0.0.1",
                port=listener.getsockname()[1],
                user=server.user,
                password=server.password,
                database=server.dbname,
                ssl=ctx,
                timeout=3,
            )

        with pytest.raises(ConfigurationError, match="check_hostname=True"):
            asyncio.run(attempt())
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing was dialled: the password went nowhere


# -- AWS tokens: one per host -----------------------------------------------------------------


def test_aws_token_for_one_host_is_never_sent_to_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    botocore_session = pytest.importorskip("botocore.session")
    import safepg.aws

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    session = botocore_session.Session()
    session.set_credentials("AKIDEXAMPLE1234567890", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    auth = safepg.aws.IAMAuth(region="eu-central-1", session=session)
    a = "db-a.abc123xyz.eu-central-1.rds.amazonaws.com"
    b = "db-b.abc123xyz.eu-central-1.rds.amazonaws.com"
    token_a = auth(ConnectTarget(a, 5432, "app_iam", "app"))
    token_b = auth(ConnectTarget(b, 5432, "app_iam", "app"))
    assert urlsplit("https://" + token_a).hostname == a
    assert urlsplit("https://" + token_b).hostname == b
    assert parse_qs(urlsplit("https://" + token_b).query)["DBUser"] == ["app_iam"]
    assert auth(ConnectTarget(a, 5432, "app_iam", "app")) == token_a  # still cached per host


def test_aws_without_botocore_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import safepg.aws

    monkeypatch.setitem(sys.modules, "botocore", None)  # import botocore raises ImportError
    monkeypatch.setitem(sys.modules, "botocore.session", None)
    auth = safepg.aws.IAMAuth(region="eu-central-1")
    with pytest.raises(ConfigurationError, match=r"pip install 'safepg-tls\[aws\]'"):
        auth(ConnectTarget("db.abc123xyz.eu-central-1.rds.amazonaws.com", 5432, "u", "app"))


# -- safepg env: a target must name a host ------------------------------------------------------


@pytest.mark.parametrize("target", ["dbname=app", "postgresql:///app", "user=app port=5433"])
def test_env_refuses_a_target_that_names_no_host(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["env", target]) == 2
    out, err = capsys.readouterr()
    assert "export" not in out
    assert "Unix-domain socket" in err


def test_env_without_a_target_still_exports(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    assert main(["env"]) == 0
    assert "export PGSSLMODE=verify-full" in capsys.readouterr().out


# -- files read back from the cache -------------------------------------------------------------


def test_only_private_regular_files_of_this_user_are_read_back(tmp_path: Path) -> None:
    cache = _cache.private_dir(tmp_path / "cache")
    good = cache / "good.json"
    _cache.write_private_file(good, b"{}")
    assert _cache.read_private_file(good) == b"{}"
    assert stat.S_IMODE(good.stat().st_mode) == 0o600

    def refused(path: Path) -> None:
        with pytest.raises(OSError):  # noqa: PT011 - any OSError: the file is not used
            _cache.read_private_file(path)

    loose = cache / "loose.json"
    loose.write_bytes(b"{}")
    for mode in (0o640, 0o604, 0o610):
        loose.chmod(mode)
        refused(loose)
    linked = cache / "linked.json"
    os.link(good, linked)  # two names: the other one may be in a directory others can write
    refused(linked)
    refused(good)
    linked.unlink()
    fifo = cache / "fifo.json"
    os.mkfifo(fifo, 0o600)
    refused(fifo)
    (cache / "link.json").symlink_to(good)
    refused(cache / "link.json")
    if os.geteuid() == 0:
        theirs = cache / "theirs.json"
        theirs.write_bytes(b"{}")
        theirs.chmod(0o600)
        os.chown(theirs, OTHER, OTHER)
        refused(theirs)


def test_a_trust_file_is_reused_only_while_it_is_unchanged(tmp_path: Path) -> None:
    cache = _cache.private_dir(tmp_path / "cache")
    pem = b"-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n"
    path = _cache.write_trust_file("anchors", pem)
    assert path.parent == cache
    assert _cache.unchanged(str(path))
    assert not _cache.unchanged(str(cache / "never-written.pem"))
    # Changed behind safepg's back: no longer "unchanged", and rewritten on the next use.
    path.write_bytes(pem.replace(b"fake", b"evil"))
    assert not _cache.unchanged(str(path))
    assert _cache.write_trust_file("anchors", pem) == path
    assert path.read_bytes() == pem
    assert _cache.unchanged(str(path))
    # Written by another process (same content, not remembered here): checked, then reused.
    _cache.clear_memory()
    before = path.stat().st_ino
    assert _cache.write_trust_file("anchors", pem) == path
    assert path.stat().st_ino == before
    assert _cache.unchanged(str(path))
    path.unlink()
    assert not _cache.unchanged(str(path))  # gone
    assert _cache.write_trust_file("anchors", pem) == path
    # Tampered with while this process was not looking: rewritten, not reused.
    _cache.clear_memory()
    path.write_bytes(pem.replace(b"fake", b"evil"))
    assert _cache.write_trust_file("anchors", pem) == path
    assert path.read_bytes() == pem
    # The directory changed in a harmless way: checked again in full, and still trusted.
    cache.chmod(0o750)
    assert _cache.unchanged(str(path))
    # A directory above that becomes writable by others: nothing in it is trusted any more.
    (tmp_path).chmod(0o777)
    try:
        assert not _cache.unchanged(str(path))
    finally:
        tmp_path.chmod(0o700)


def test_a_verified_chain_is_not_checked_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = _cache.chain_problem

    def counted(directory: str, *, root_may_own: bool = False) -> str | None:
        calls.append(directory)
        return real(directory, root_may_own=root_may_own)

    monkeypatch.setattr(_cache, "chain_problem", counted)
    location = tmp_path / "cache"
    first = _cache.private_dir(location)
    for _ in range(3):
        assert _cache.private_dir(location) == first
    assert len(calls) == 1  # lstat of each directory only, while nothing changed
    location.chmod(0o750)  # a change of mode: checked again, in full
    assert _cache.private_dir(location) == first
    assert len(calls) == 2
    location.rmdir()  # removed: made again, and checked
    assert _cache.private_dir(location) == first
    assert len(calls) == 3
    # Missing parents are made too (mode 0700); a place that cannot be made is refused.
    assert _cache.private_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="cannot create"):
        _cache.private_dir(tmp_path / "file" / "cache")


@pytest.mark.parametrize(("same", "mode"), [(True, 0o600), (False, 0o600), (True, 0o644)])
def test_a_file_replaced_while_written_is_kept_only_if_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same: bool, mode: int
) -> None:
    """Another writer (a thread, a process of this user's) replaces the file just after
    safepg's rename: safepg keeps it only when it holds the same bytes."""
    cache = _cache.private_dir(tmp_path / "cache")
    path = cache / "entry.json"
    real_replace = os.replace

    def and_then_another_writer(src: str, dst: str | Path) -> None:
        real_replace(src, dst)
        other = cache / ".other"
        other.write_bytes(b"{}" if same else b'{"evil": 1}')
        other.chmod(mode)
        real_replace(other, dst)

    monkeypatch.setattr(os, "replace", and_then_another_writer)
    if same and mode == 0o600:
        _cache.write_private_file(path, b"{}")
        monkeypatch.undo()
        assert _cache.unchanged(str(path))
    else:
        with pytest.raises(ConfigurationError, match="was replaced while safepg wrote it"):
            _cache.write_private_file(path, b"{}")


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache.private_dir(tmp_path / "cache")

    def fails(src: str, dst: str | Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError, match="No space left"):
        _cache.write_private_file(cache / "entry.json", b"{}")
    assert list(cache.iterdir()) == []


# -- the session check: what the report says, and what it refuses --------------------------------


def test_check_refuses_a_protocol_below_tls_1_2(server: PostgresServer) -> None:
    with safepg.connect(server.conninfo(hostaddr="127.0.0.1")) as conn:
        report = safepg.check(conn)
    assert report.hostaddr == "127.0.0.1"
    assert report.protocol in _check.ACCEPTED_PROTOCOLS
    for client, backend in (("TLSv1.1", "TLSv1.3"), (None, "TLSv1"), ("SSLv3", None)):
        weak = dataclasses.replace(report, protocol=client, backend_protocol=backend)
        with pytest.raises(InsecureConnectionError, match=r"below the TLS 1\.2 minimum"):
            _check._finish(weak, None, allow_socket=False)
    unknown = dataclasses.replace(report, protocol=None, backend_protocol=None)
    assert _check._finish(unknown, None, allow_socket=False) is unknown  # a pooler in between
    assert report.port == server.port
    text = str(report)
    assert f"  cipher:        {report.cipher} ({report.bits} bits)\n" in text
    assert f"  protocol:      {report.protocol}\n" in text
    assert f"  TLS library:   {report.ssl_library}\n" in text
    assert "client cert:" not in text
    with_client = dataclasses.replace(report, client_dn="/CN=app")
    assert "  client cert:   /CN=app" in str(with_client)


def test_a_socket_session_without_the_opt_in_fails_the_check(server: PostgresServer) -> None:
    plan = _params.build_plan(server.conninfo(), {})  # no opt-in
    socket_conninfo = server.conninfo(host=str(server.socket_dir), sslmode="disable")
    with psycopg.connect(socket_conninfo) as conn:
        _check._plans[conn] = plan
        with pytest.raises(InsecureConnectionError, match="below safepg's policy"):
            safepg.check(conn)

    async def run_async() -> None:
        async with await psycopg.AsyncConnection.connect(socket_conninfo) as aconn:
            _check._plans[aconn] = plan
            with pytest.raises(InsecureConnectionError, match="below safepg's policy"):
                await safepg.check_async(aconn)

    asyncio.run(run_async())


def test_the_report_shows_both_sides_and_cannot_be_altered(server: PostgresServer) -> None:
    with safepg.connect(server.conninfo()) as conn:
        report = safepg.check(conn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.verified = False  # type: ignore[misc]
    text = str(report)
    assert f"  trust anchors: {report.trust}\n" in text
    assert f", {report.backend_protocol}, {report.backend_cipher}" in text
    assert report.backend_ssl is True

    async def async_report() -> safepg.SSLReport:
        async with await safepg.connect_async(server.conninfo()) as aconn:
            return await safepg.check_async(aconn)

    seen = asyncio.run(async_report())
    assert seen.verified
    assert seen.backend_ssl is True  # the server's side was read too
    assert seen.backend_protocol == seen.protocol


def test_env_leaves_the_environment_as_it_found_it(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`safepg env` asks libpq with its exports in place, then puts the environment back."""
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    monkeypatch.setenv("PGGSSENCMODE", "disable")
    assert main(["env", "host=db.example.com"]) == 0
    assert "export PGSSLMODE=verify-full" in capsys.readouterr().out
    assert "PGSSLMODE" not in os.environ
    assert "PGSSLROOTCERT" not in os.environ
    assert "PGSSLMINPROTOCOLVERSION" not in os.environ
    assert os.environ["PGGSSENCMODE"] == "disable"


def test_token_margin_bounds() -> None:
    from safepg._tokens import margin_seconds

    assert margin_seconds(0) == 0.0  # no margin is allowed: the token is used until it expires
    assert margin_seconds(899, 900) == 899.0
    for margin, lifetime in ((-1, None), (-0.5, 900), (900, 900), (float("nan"), None)):
        with pytest.raises(ConfigurationError, match="margin must be 0 or more seconds") as info:
            margin_seconds(margin, lifetime)
        assert ("token lifetime (900 s)" in str(info.value)) is (lifetime is not None)


def test_azure_errors_auth_failures_only_and_no_token_refused() -> None:
    import safepg.azure

    class ClientAuthenticationError(Exception):  # azure-core's, matched by name
        pass

    class Raising:
        def __init__(self, ex: BaseException) -> None:
            self.ex = ex

        def get_token(self, *scopes: str) -> Any:
            raise self.ex

    class Returning:
        def __init__(self, token: object) -> None:
            self.token = token

        def get_token(self, *scopes: str) -> Any:
            return type("AccessToken", (), {"token": self.token, "expires_on": 2**40})()

    target = ConnectTarget("h", 5432, "u", "d")

    def call(credential: object) -> str:
        return safepg.azure.EntraAuth(credential, hosts=["h"])(target)

    with pytest.raises(RuntimeError, match="network down"):  # not an auth failure: as it is
        call(Raising(RuntimeError("network down")))
    with pytest.raises(ConfigurationError, match=r"token: first line\. Sign in") as info:
        call(Raising(ClientAuthenticationError("first line\nsecond line")))
    assert "second line" not in str(info.value)
    with pytest.raises(ConfigurationError, match=r"token: ClientAuthenticationError\. Sign in"):
        call(Raising(ClientAuthenticationError("  ")))
    for empty in ("", None, b"bytes"):
        with pytest.raises(ConfigurationError, match="returned no token"):
            call(Returning(empty))
    assert call(Returning("entra-token")) == "entra-token"


def test_azure_without_azure_identity_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import safepg.azure

    monkeypatch.setitem(sys.modules, "azure.identity", None)  # import raises ImportError
    auth = safepg.azure.EntraAuth(hosts=["h"])
    with pytest.raises(ConfigurationError, match=r"pip install 'safepg-tls\[azure\]'"):
        auth(ConnectTarget("h", 5432, "u", "d"))


class _GoogleCredentials:
    """google.auth.credentials.Credentials' interface; records the request it refreshes with."""

    def __init__(self, token: str | None = None, valid: bool = False, gives: object = "ya29.new"):
        self.token: object = token
        self.valid = valid
        self.expiry = None
        self.gives = gives
        self.requests: list[object] = []

    def refresh(self, request: object) -> None:
        self.requests.append(request)
        self.token, self.valid = self.gives, True


def test_gcp_credentials_and_request_are_loaded_only_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("google.auth.transport.requests")
    import google.auth.transport.requests

    import safepg.gcp

    target = ConnectTarget("h", 5432, "u", "d")
    # Credentials given, no request: a google-auth Request is made; the credentials are kept.
    creds = _GoogleCredentials()
    assert safepg.gcp.IAMAuth(creds)(target) == "ya29.new"
    assert isinstance(creds.requests[0], google.auth.transport.requests.Request)
    # Both given: used as they are.
    mine = object()
    creds = _GoogleCredentials()
    assert safepg.gcp.IAMAuth(creds, request=mine)(target) == "ya29.new"
    assert creds.requests == [mine]
    # A token that is there but no longer valid is refreshed, not reused.
    creds = _GoogleCredentials(token="ya29.stale", valid=False)
    assert safepg.gcp.IAMAuth(creds, request=mine)(target) == "ya29.new"
    # No credentials: google-auth's default ones, and none are found here.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    with pytest.raises(ConfigurationError, match="could not get a Google IAM token"):
        safepg.gcp.IAMAuth(request=mine)(target)
    # Credentials that give no token are refused.
    for empty in ("", None, b"bytes"):
        with pytest.raises(ConfigurationError, match="gave no access token"):
            safepg.gcp.IAMAuth(_GoogleCredentials(gives=empty), request=mine)(target)


def test_gcp_without_google_auth_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import safepg.gcp

    monkeypatch.setitem(sys.modules, "google.auth", None)  # import raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'safepg-tls\[gcp\]'"):
        safepg.gcp.IAMAuth()(ConnectTarget("h", 5432, "u", "d"))


def test_psycopg2_socket_opt_in_does_not_pass_an_unencrypted_tcp_session(
    server: PostgresServer,
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    import safepg.psycopg2

    plan = _params.build_plan(
        server.conninfo(host=str(server.socket_dir)), {}, allow_unencrypted_unix_socket=True
    )
    plain = psycopg2.connect(server.conninfo(sslmode="disable"))
    try:
        assert not plain.info.ssl_in_use
        assert safepg.psycopg2._session_problem(plain, plan) is not None
    finally:
        plain.close()
    sock = psycopg2.connect(server.conninfo(host=str(server.socket_dir), sslmode="disable"))
    try:
        assert safepg.psycopg2._session_problem(sock, plan) is None  # the opt-in's own case
    finally:
        sock.close()


@pytest.mark.parametrize("name", ["async", "async_"])
def test_psycopg2_asynchronous_connections_are_refused(server: PostgresServer, name: str) -> None:
    pytest.importorskip("psycopg2")
    import safepg.psycopg2

    with pytest.raises(ConfigurationError, match="does not open asynchronous connections"):
        safepg.psycopg2.connect(server.conninfo(), **{name: True})  # type: ignore[arg-type]


def test_gcp_errors_name_the_hosts_and_show_one_line() -> None:
    exceptions = pytest.importorskip("google.auth.exceptions")
    import safepg.gcp

    class Failing(_GoogleCredentials):
        def __init__(self, message: str) -> None:
            super().__init__()
            self.message = message

        def refresh(self, request: object) -> None:
            raise exceptions.RefreshError(self.message)

    mine = object()
    pinned = safepg.gcp.IAMAuth(_GoogleCredentials(), request=mine, hosts=["db.example.com"])
    with pytest.raises(ConfigurationError, match=r"hosts it was given \(db\.example\.com\)"):
        pinned(ConnectTarget("other.example.com", 5432, "u", "d"))
    target = ConnectTarget("h", 5432, "u", "d")
    with pytest.raises(ConfigurationError, match=r"\(RefreshError: first\)") as info:
        safepg.gcp.IAMAuth(Failing("first\nsecond"), request=mine)(target)
    assert "second" not in str(info.value)
    with pytest.raises(ConfigurationError, match=r"\(RefreshError: \)"):
        safepg.gcp.IAMAuth(Failing("  "), request=mine)(target)


def test_the_shared_asyncpg_context_cannot_be_changed(server: PostgresServer) -> None:
    """safepg's asyncpg connections share one context per trust file; whoever holds one
    connection must not be able to weaken it for every later one."""
    asyncpg = pytest.importorskip("asyncpg")
    import safepg.asyncpg

    async def shared() -> ssl.SSLContext:
        conn = await safepg.asyncpg.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            database=server.dbname,
            sslrootcert=str(server.ca_path),
        )
        try:
            assert isinstance(conn, asyncpg.Connection)
            ctx = conn._transport.get_extra_info("sslcontext")
            assert isinstance(ctx, ssl.SSLContext)
            return ctx
        finally:
            await conn.close()

    ctx = asyncio.run(shared())
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        ctx.check_hostname = False
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        del ctx.keylog_filename
    with pytest.raises(AttributeError, match="shared by safepg's connections"):
        ctx.load_verify_locations(cadata="")
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
