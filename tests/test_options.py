"""The option policy (`safepg._options`): every libpq option has a disposition, an unknown one
is refused by name, and a refused one (``sslkeylogfile``) is refused on every path, whatever
set it: a URL, a keyword or a service file. The real server shows that no session is opened:
the key log file is never written."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from psycopg import pq

import safepg
from safepg import ConfigurationError, _options, _params
from safepg._cli import main
from safepg._options import BY_KEYWORD, ENVIRONMENT, OPTIONS, Disposition
from safepg.testing import PostgresServer

# The options the running libpq knows (PQconndefaults), with their variables and defaults.
LIBPQ = {o.keyword.decode(): o for o in pq.Conninfo.get_defaults()}
HAS_KEYLOG = "sslkeylogfile" in LIBPQ
needs_keylog = pytest.mark.skipif(
    not HAS_KEYLOG,
    reason=f"libpq {pq.version()} has no sslkeylogfile (libpq 18 has: PSYCOPG_IMPL=binary)",
)


# -- the table ----------------------------------------------------------------------------------


def test_every_option_of_the_running_libpq_is_in_the_table() -> None:
    missing = sorted(set(LIBPQ) - set(BY_KEYWORD))
    assert not missing, f"libpq {pq.version()} has options the policy table lacks: {missing}"
    for keyword, option in LIBPQ.items():
        entry = BY_KEYWORD[keyword]
        envvar = option.envvar.decode() if option.envvar else None
        assert entry.envvar == envvar, keyword
        assert entry.since <= pq.version() // 10000 <= entry.until, keyword


def test_the_table_names_each_option_and_variable_once() -> None:
    assert len(BY_KEYWORD) == len(OPTIONS)
    assert frozenset(BY_KEYWORD) == _options._KNOWN
    names = [o.envvar for o in OPTIONS if o.envvar] + [v.name for v in ENVIRONMENT]
    assert len(names) == len(set(names))


def test_what_libpq_paths_refuse_asyncpg_refuses_too() -> None:
    for option in OPTIONS:
        if option.libpq.disposition is Disposition.REFUSE:
            assert option.asyncpg.disposition is Disposition.REFUSE, option.keyword
            assert option.libpq.why
            assert option.asyncpg.why


def test_an_option_libpq_resolves_that_the_table_lacks_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As a newer libpq's option would be: libpq resolves sslsni (default 1) on every connect.
    monkeypatch.delitem(BY_KEYWORD, "sslsni")
    monkeypatch.setattr(_options, "_KNOWN", frozenset(BY_KEYWORD))
    with pytest.raises(ConfigurationError, match=r"option\(s\) sslsni, which safepg's option"):
        _params.build_plan("host=db.example.com", {})


def test_a_refusal_never_shows_the_value() -> None:
    secret = "/srv/keys/s3cr3t-path.log"
    with pytest.raises(ConfigurationError) as info:
        _options.check({"sslcompression": "1"}, {"oauth_client_secret": secret})
    assert secret not in str(info.value)
    with pytest.raises(ConfigurationError, match="oauth_client_secret") as info:
        _options.check({}, {"oauth_client_secret": secret})
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("conninfo", "name"),
    [
        ("host=db.example.com sslcompression=1", "sslcompression"),
        *(
            [
                ("host=db.example.com scram_client_key=AAAA", "scram_client_key"),
                ("host=db.example.com oauth_issuer=https://i.example oauth_client_id=c", "oauth_"),
            ]
            if "oauth_issuer" in LIBPQ
            else []
        ),
    ],
)
def test_libpq_paths_refuse_what_leaks_or_widens(conninfo: str, name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"refuses the connection option {name}"):
        _params.build_plan(conninfo, {})


def test_refused_variables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOAUTHDEBUG", "UNSAFE")
    with pytest.raises(ConfigurationError, match="PGOAUTHDEBUG environment variable"):
        _params.build_plan("host=db.example.com", {})


def test_what_narrows_or_only_hides_passes_through() -> None:
    # sslsni=0 keeps the name out of the ClientHello; libpq still verifies it. The others
    # only narrow what libpq accepts.
    plan = _params.build_plan(
        "host=db.example.com sslsni=0 channel_binding=require requirepeer=postgres", {}
    )
    assert plan.params["sslsni"] == "0"
    assert plan.params["channel_binding"] == "require"


# -- sslkeylogfile, on every path -----------------------------------------------------------


@dataclass
class KeyLog:
    path: Path
    url: str  # with the option in its query for origin "url"
    kwargs: dict[str, Any]  # with the option for origin "keyword"
    origin: str

    def refused(self, err: BaseException) -> None:
        assert "sslkeylogfile" in str(err), str(err)
        assert not self.path.exists(), "libpq wrote the session's TLS secrets"


@pytest.fixture(params=["url", "keyword", "service"])
def keylog(
    request: pytest.FixtureRequest,
    server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KeyLog]:
    if not HAS_KEYLOG:
        pytest.skip(f"libpq {pq.version()} has no sslkeylogfile (libpq 18 has)")
    # libpq 18 reads it from no environment variable: a URL, a keyword or a service file.
    assert LIBPQ["sslkeylogfile"].envvar is None
    path = tmp_path / "keys.log"
    url, kwargs = server.url(), dict[str, Any]()
    if request.param == "url":
        url += "&sslkeylogfile=" + quote(str(path), safe="")
    elif request.param == "keyword":
        kwargs = {"sslkeylogfile": str(path)}
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[app]\nsslkeylogfile={path}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "app")
    yield KeyLog(path, url, kwargs, request.param)
    assert not path.exists()


def _refused(keylog: KeyLog, call: Callable[[], Any]) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is asserted below
        call()
    err = getattr(info.value, "orig", None) or info.value  # SQLAlchemy wraps the driver's
    assert isinstance(err, ConfigurationError), repr(info.value)
    keylog.refused(err)
    if keylog.origin == "service":  # where it came from, named
        assert "(from service 'app'" in str(err) or "(from a service file" in str(err), str(err)


def test_keylog_connect(keylog: KeyLog) -> None:
    _refused(keylog, lambda: safepg.connect(keylog.url, **keylog.kwargs))


def test_keylog_connect_async(keylog: KeyLog) -> None:
    _refused(keylog, lambda: asyncio.run(safepg.connect_async(keylog.url, **keylog.kwargs)))


def test_keylog_pool(keylog: KeyLog, caplog: pytest.LogCaptureFixture) -> None:
    from psycopg_pool import PoolTimeout

    from safepg.pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(
        keylog.url, kwargs=keylog.kwargs, min_size=1, open=False
    )
    with caplog.at_level(logging.WARNING), pytest.raises(PoolTimeout):
        pool.open(wait=True, timeout=1.5)
    pool.close()
    assert "refuses the connection option sslkeylogfile" in caplog.text
    assert not keylog.path.exists()


def test_keylog_async_pool(keylog: KeyLog, caplog: pytest.LogCaptureFixture) -> None:
    from psycopg_pool import PoolTimeout

    from safepg.pool import AsyncConnectionPool

    async def go() -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            keylog.url, kwargs=keylog.kwargs, min_size=1, open=False
        )
        try:
            await pool.open(wait=True, timeout=1.5)
        finally:
            await pool.close()

    with caplog.at_level(logging.WARNING), pytest.raises(PoolTimeout):
        asyncio.run(go())
    assert "refuses the connection option sslkeylogfile" in caplog.text
    assert not keylog.path.exists()


def test_keylog_sqlalchemy(keylog: KeyLog) -> None:
    from safepg.sqlalchemy import create_engine

    def connect() -> None:
        url = keylog.url.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = create_engine(url, connect_args=keylog.kwargs)
        try:
            with engine.connect():
                pass  # pragma: no cover
        finally:
            engine.dispose()

    _refused(keylog, connect)


def test_keylog_psycopg2(keylog: KeyLog) -> None:
    psycopg2 = pytest.importorskip("safepg.psycopg2")
    _refused(keylog, lambda: psycopg2.connect(keylog.url, **keylog.kwargs))


def test_keylog_django(keylog: KeyLog, server: PostgresServer) -> None:
    pytest.importorskip("django")
    from safepg.django.base import DatabaseClient

    options = {"sslrootcert": str(server.ca_path), **keylog.kwargs}
    if keylog.origin == "url":
        options["sslkeylogfile"] = str(keylog.path)  # Django has no URL: its OPTIONS
    settings = {
        "NAME": server.dbname,
        "USER": server.user,
        "PASSWORD": server.password,
        "HOST": server.host,
        "PORT": str(server.port),
        "OPTIONS": options,
    }
    # dbshell: psql's command line is built through the same plan.
    _refused(keylog, lambda: DatabaseClient.settings_to_cmd_args_env(settings, []))
    # The backend's connections go through safepg.connect with these OPTIONS.
    from safepg.django.base import DatabaseWrapper

    params = dict(options)
    _refused(
        keylog,
        lambda: DatabaseWrapper.Database.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            dbname=server.dbname,
            **params,
        ),
    )


def test_keylog_asyncpg(keylog: KeyLog) -> None:
    pytest.importorskip("asyncpg")
    import safepg.asyncpg

    _refused(keylog, lambda: asyncio.run(safepg.asyncpg.connect(keylog.url, **keylog.kwargs)))


def test_keylog_asyncpg_engine(keylog: KeyLog) -> None:
    pytest.importorskip("asyncpg")
    from safepg.sqlalchemy import create_async_engine

    url = keylog.url.replace("postgresql://", "postgresql+asyncpg://", 1)
    _refused(keylog, lambda: create_async_engine(url, connect_args=keylog.kwargs))


def test_keylog_cli(keylog: KeyLog, capsys: pytest.CaptureFixture[str]) -> None:
    if keylog.origin == "keyword":
        pytest.skip("the command line takes a URL or conninfo, and the environment")
    for command in ("check", "env"):
        assert main([command, keylog.url]) != 0
        out, err = capsys.readouterr()
        assert "refuses the connection option sslkeylogfile" in err, (command, out, err)
        assert "export" not in out
    assert not keylog.path.exists()


def test_a_driver_on_a_newer_libpq_is_refused(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg2 reads the environment with its own libpq: one newer than the table could
    # honour an option nobody reviewed.
    psycopg2 = pytest.importorskip("psycopg2")
    import safepg.psycopg2

    newer = (_options.NEWEST_LIBPQ + 1) * 10000
    monkeypatch.setattr(psycopg2, "__libpq_version__", newer)
    with pytest.raises(ConfigurationError, match=f"psycopg2 uses libpq {newer // 10000}"):
        safepg.psycopg2.connect(server.url())


def test_the_newest_libpq_the_table_holds_is_the_newest_it_names() -> None:
    assert max(o.since for o in OPTIONS) == _options.NEWEST_LIBPQ
    assert pq.version() // 10000 <= _options.NEWEST_LIBPQ


def test_a_service_named_by_pgservice_is_named_as_the_origin(
    server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # PQconndefaults applies the service PGSERVICE names: compared with it, the service's
    # settings looked like libpq's defaults (a weak sslmode raised silently, the trust
    # anchors labelled "libpq's default").
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[app]\nsslrootcert={server.ca_path}\nsslmode=disable\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "app")
    with caplog.at_level(logging.WARNING, logger="safepg"):
        plan = _params.build_plan("host=db.example.com", {})
    assert plan.trust.label == "sslrootcert from service 'app' in the service file"
    assert "sslmode=disable (from service 'app' in the service file) raised" in caplog.text


# -- decisions the mutation stage showed untested (mutation/RESULTS.md) -----------------------


def test_a_refusal_names_the_accepted_values_only_when_there_are_some(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError, match=r"\(CRIME\) \(accepted: 0\)\. Remove it"):
        _options.check({"sslcompression": "1"}, {})
    with pytest.raises(ConfigurationError, match="require_auth") as info:
        _options.asyncpg_settings({}, {"require_auth": "password"})
    assert "accepted" not in str(info.value)


def test_asyncpg_gets_only_what_differs_from_libpq_defaults() -> None:
    # An option set to libpq's default changes nothing: asyncpg is not given it.
    defaults = {"target_session_attrs": "any", "krbsrvname": "postgres", "sslnegotiation": ""}
    assert _options.asyncpg_settings(defaults, {}) == {}
    assert _options.asyncpg_settings({"krbsrvname": "other"}, {}) == {"krbsrvname": "other"}


def test_asyncpg_reads_the_variables_the_running_libpq_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As with libpq 15 (PSYCOPG_IMPL=python), which has no require_auth and so never resolves
    # PGREQUIREAUTH: asyncpg must not drop what a newer libpq would honour.
    monkeypatch.setattr(_options, "UNSEEN_VARIABLES", (("require_auth", "PGREQUIREAUTH"),))
    monkeypatch.delenv("PGREQUIREAUTH", raising=False)
    assert _options.asyncpg_settings({}, {}) == {}
    monkeypatch.setenv("PGREQUIREAUTH", "password")
    with pytest.raises(ConfigurationError, match="refuses the connection option require_auth"):
        _options.asyncpg_settings({}, {})


def test_no_home_directory_means_no_default_crl(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A user with no HOME and no password-database entry (a container run with --user 12345):
    # libpq has no default root.crl, and there is nothing to check.
    from safepg import _trust

    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.setattr(_trust, "libpq_default_root", lambda: None)
    _options.check_crl_files({})
    assert _options.crls(None, "nowhere") == b""


def test_pins_follow_the_libpq_versions_that_have_each_option() -> None:
    # requiressl, tty and authtype: libpq 7 through 13 (a psycopg2 wheel's own libpq may be
    # that old); sslkeylogfile from libpq 18.
    assert {"requiressl", "tty", "authtype"} <= _options.pins({}, 13).keys()
    assert not {"requiressl", "tty", "authtype"} & _options.pins({}, 14).keys()
    assert "sslkeylogfile" in _options.pins({}, 18)
    assert "sslkeylogfile" not in _options.pins({}, 17)
    assert _options.pins({"sslcrl": "/x.crl"}, 16)["sslcrl"] == "/x.crl"


def test_a_driver_on_the_newest_libpq_the_table_holds_is_accepted() -> None:
    newest = _options.NEWEST_LIBPQ
    _options.check_driver_libpq(newest * 10000 + 3, "psycopg2")  # e.g. 18.3: no error
    with pytest.raises(ConfigurationError, match=f"psycopg2 uses libpq {newest + 1}"):
        _options.check_driver_libpq((newest + 1) * 10000, "psycopg2")


@pytest.mark.parametrize("count", [3, 4])
def test_a_crl_directory_refusal_lists_three_certificates(tmp_path: Path, count: int) -> None:
    crldir = tmp_path / f"crls{count}"
    crldir.mkdir()
    for n in range(count):
        (crldir / f"0000000{n}.0").write_bytes(b"")  # OpenSSL would open each as a certificate
    with pytest.raises(ConfigurationError) as info:
        _options.check_crl_files({"sslcrldir": str(crldir)})
    shown = "00000000.0, 00000001.0, 00000002.0"
    listed = f"{shown}, ..., which OpenSSL" if count > 3 else f"{shown}, which OpenSSL"
    assert listed in str(info.value)


def test_a_crl_file_is_described_by_what_it_holds(tmp_path: Path) -> None:
    from safepg.testing import CertificateAuthority

    from .test_driver_policy import write_crl

    ca = CertificateAuthority("crl CA")
    mixed = write_crl(tmp_path / "mixed.crl", ca)
    mixed.write_bytes(mixed.read_bytes() + ca.cert_pem)
    with pytest.raises(ConfigurationError, match="it holds CERTIFICATE, X509 CRL"):
        _options.check_crl_files({"sslcrl": str(mixed)})
    empty = tmp_path / "empty.crl"
    empty.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="it holds no PEM block"):
        _options.check_crl_files({"sslcrl": str(empty)})
    # A CRL file that does not exist: libpq skips it, and so does the check.
    _options.check_crl_files({"sslcrl": str(tmp_path / "missing.crl")})


def test_a_refused_variable_is_refused_with_its_own_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    why = next(v.libpq.why for v in ENVIRONMENT if v.name == "PGOAUTHDEBUG")
    assert why != ENVIRONMENT[0].libpq.why
    monkeypatch.setenv("PGOAUTHDEBUG", "UNSAFE")
    with pytest.raises(ConfigurationError) as info:
        _options.check({}, {})
    assert f"safepg refuses it: {why}. Unset PGOAUTHDEBUG" in str(info.value)


def test_a_crl_file_up_to_the_size_limit_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safepg.testing import CertificateAuthority

    from .test_driver_policy import write_crl

    crl = write_crl(tmp_path / "ca.crl", CertificateAuthority("crl CA"))
    size = len(crl.read_bytes())
    monkeypatch.setattr(_options, "_MAX_CRL_FILE", size)
    assert _options.read_crl(str(crl), "a test") == crl.read_bytes()
    monkeypatch.setattr(_options, "_MAX_CRL_FILE", size - 1)
    with pytest.raises(ConfigurationError, match="must hold PEM CRLs"):
        _options.read_crl(str(crl), "a test")


def test_an_unreadable_crl_file_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "missing.crl"
    with pytest.raises(ConfigurationError) as info:
        _options.read_crl(str(missing), "the sslcrl argument")
    assert "(sslcrl, from the sslcrl argument) cannot be read: No such file or directory" in str(
        info.value
    )
    with pytest.raises(ConfigurationError, match="cannot be read: No such file"):
        safepg.ssl_context("localhost", sslcrl=missing)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing user needs root"
)
@pytest.mark.parametrize("how", ["setuid", "seteuid"])
def test_the_default_files_follow_a_change_of_user(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Without HOME, libpq's default root.crt and root.crl are in the effective user's home
    (its password-database entry). A worker forked by a root service that then changes user
    must have that user's files checked, not the parent's."""
    import pwd

    from safepg import _trust

    from .test_guarantees import NOBODY, as_user, in_child

    monkeypatch.delenv("HOME")
    _options.check_crl_files({})  # the parent (root) looked at its own once
    home = pwd.getpwuid(NOBODY).pw_dir

    def look() -> list[str | None]:
        return [str(_trust.libpq_default_root()), _options._default_crl()]

    def seteuid_and_look() -> list[str | None]:
        os.seteuid(NOBODY)  # the real user stays root: libpq goes by the effective one
        return look()

    seen = as_user(NOBODY, look) if how == "setuid" else in_child(seteuid_and_look)
    assert seen == [f"{home}/.postgresql/root.crt", f"{home}/.postgresql/root.crl"]


def test_the_default_crl_is_checked_in_every_home_a_libpq_may_take(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """libpq 15 and later read ~/.postgresql from HOME, libpq 14 from the effective user's
    password-database entry whatever HOME says: both are checked."""
    import pwd

    from safepg import _trust

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    passwd_home = Path(pwd.getpwuid(os.geteuid()).pw_dir)
    assert _trust.libpq_homes() == (
        tmp_path / "home" / ".postgresql",
        passwd_home / ".postgresql",
    )
    assert _options._default_crls() == [
        str(tmp_path / "home" / ".postgresql" / "root.crl"),
        str(passwd_home / ".postgresql" / "root.crl"),
    ]
    monkeypatch.setenv("HOME", str(passwd_home))  # the same home: listed once
    assert _trust.libpq_homes() == (passwd_home / ".postgresql",)
