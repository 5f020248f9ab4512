"""Hardening, without a server: what libpq is told, and what is refused before any I/O."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

import safepg
from safepg import ConfigurationError, _params

WEAK_MODES = ["disable", "allow", "prefer", "require", "verify-ca"]


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    from safepg.testing import CertificateAuthority

    return str(CertificateAuthority().write_cert(tmp_path / "ca.pem"))


def final(conninfo: str = "", **kwargs: object) -> dict[str, str]:
    return {
        k: str(v)
        for k, v in conninfo_to_dict(safepg.secure_conninfo(conninfo, **kwargs)).items()  # type: ignore[arg-type]
    }


def write_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[svc]\n{body}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(path))


@pytest.mark.parametrize("mode", [*WEAK_MODES, "verify-full"])
def test_sslmode_in_conninfo_is_raised(mode: str, ca_file: str) -> None:
    params = final(f"host=db.example.com sslmode={mode} sslrootcert={ca_file}")
    assert params["sslmode"] == "verify-full"
    assert params["sslrootcert"] == ca_file
    assert params["gssencmode"] == "disable"
    assert params["ssl_min_protocol_version"] == "TLSv1.2"


@pytest.mark.parametrize("mode", WEAK_MODES)
def test_sslmode_in_kwargs_is_raised(mode: str, ca_file: str) -> None:
    params = final("host=db.example.com", sslmode=mode, sslrootcert=ca_file)
    assert params["sslmode"] == "verify-full"


@pytest.mark.parametrize("mode", WEAK_MODES)
def test_sslmode_from_pgsslmode_is_raised(
    mode: str, ca_file: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PGSSLMODE", mode)
    with caplog.at_level(logging.WARNING, logger="safepg"):
        assert final("host=db.example.com", sslrootcert=ca_file)["sslmode"] == "verify-full"
    assert f"sslmode={mode} (from the PGSSLMODE environment variable)" in caplog.text


def test_sslmode_from_service_file_is_raised(
    ca_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_service(
        tmp_path, monkeypatch, f"host=db.example.com\nsslmode=disable\nsslrootcert={ca_file}"
    )
    with caplog.at_level(logging.WARNING, logger="safepg"):
        params = final("service=svc")
    assert params["sslmode"] == "verify-full"
    assert "sslmode=disable (from service 'svc' in the service file)" in caplog.text
    assert safepg.resolve_trust("service=svc").label == (
        "sslrootcert from service 'svc' in the service file"
    )


def test_checked_host_is_pinned(
    ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host checked is the host used, even if the service file changes before libpq reads it.
    write_service(tmp_path, monkeypatch, "host=db.example.com\nport=6432")
    params = final("service=svc", sslrootcert=ca_file)
    assert (params["host"], params["port"]) == ("db.example.com", "6432")
    monkeypatch.setenv("PGHOST", "db.example.com")
    monkeypatch.setenv("PGHOSTADDR", "127.0.0.1")
    params = final(sslrootcert=ca_file)
    assert (params["host"], params["hostaddr"]) == ("db.example.com", "127.0.0.1")


def test_libpq_resolution_is_remembered_per_environment_without_secrets(
    ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conninfo = "host=db.example.com password=pw-7Qx2v9 sslpassword=key-7Qx2v9"
    monkeypatch.setenv("PGPASSWORD", "env-7Qx2v9")
    assert final(conninfo, sslrootcert=ca_file)["port"] == "5432"
    assert final(conninfo, sslrootcert=ca_file)["port"] == "5432"  # remembered
    monkeypatch.setenv("PGPORT", "6543")  # another environment: resolved again
    assert final(conninfo, sslrootcert=ca_file)["port"] == "6543"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    assert final(conninfo, sslrootcert=ca_file)["connect_timeout"] == "7"
    remembered = repr(_params._VIEWS)
    assert "db.example.com" in remembered
    assert "7Qx2v9" not in remembered  # neither in the keys nor in what libpq resolved
    for i in range(2 * _params._VIEWS_MAX):
        final(f"host=db{i}.example.com", sslrootcert=ca_file)
    assert len(_params._VIEWS) == _params._VIEWS_MAX  # bounded


def test_a_changed_service_file_is_read_again(
    ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_service(tmp_path, monkeypatch, "host=db.example.com\nport=6432")
    assert final("service=svc", sslrootcert=ca_file)["port"] == "6432"
    write_service(tmp_path, monkeypatch, "host=db.example.com\nport=7000")
    assert final("service=svc", sslrootcert=ca_file)["port"] == "7000"


def test_pgservice_variable_is_honoured(
    ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_service(tmp_path, monkeypatch, "host=/var/run/postgresql")
    monkeypatch.setenv("PGSERVICE", "svc")
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.secure_conninfo(sslrootcert=ca_file)


def test_weak_sslmode_warns_once(ca_file: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        for _ in range(3):
            final(f"host=db.example.com sslmode=require sslrootcert={ca_file}")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sslmode=require (from the conninfo string) raised to verify-full" in warnings[0].message


def test_libpq_default_sslmode_is_raised_silently(
    ca_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        final(f"host=db.example.com sslrootcert={ca_file}")
    # Nothing about raising it (the choice of trust anchors is logged at DEBUG, for -v).
    assert [r.getMessage() for r in caplog.records if "raised" in r.getMessage()] == []


@pytest.mark.parametrize("source", ["conninfo", "kwargs", "env"])
def test_gssencmode_is_disabled(
    source: str, ca_file: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    conninfo = f"host=db.example.com sslrootcert={ca_file}"
    kwargs = {}
    if source == "conninfo":
        conninfo += " gssencmode=require"
    elif source == "kwargs":
        kwargs["gssencmode"] = "require"
    else:
        monkeypatch.setenv("PGGSSENCMODE", "require")
    with caplog.at_level(logging.WARNING, logger="safepg"):
        assert final(conninfo, **kwargs)["gssencmode"] == "disable"
    assert "gssencmode=require" in caplog.text


@pytest.mark.parametrize(
    ("given", "expected"),
    [("TLSv1", "TLSv1.2"), ("TLSv1.1", "TLSv1.2"), ("TLSv1.2", "TLSv1.2"), ("TLSv1.3", "TLSv1.3")],
)
def test_tls_minimum_can_be_raised_not_lowered(given: str, expected: str, ca_file: str) -> None:
    params = final(f"host=db.example.com sslrootcert={ca_file}", ssl_min_protocol_version=given)
    assert params["ssl_min_protocol_version"] == expected


@pytest.mark.parametrize(
    ("minimum", "match"),
    [
        (None, "invalid SSL protocol version range"),  # libpq's own check, default minimum
        ("TLSv1", "ssl_max_protocol_version=TLSv1.1 is below the minimum TLSv1.2"),  # ours
    ],
)
def test_tls_maximum_below_the_minimum_is_refused(
    minimum: str | None, match: str, ca_file: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        safepg.secure_conninfo(
            f"host=db.example.com sslrootcert={ca_file}",
            ssl_min_protocol_version=minimum,
            ssl_max_protocol_version="TLSv1.1",
        )


def test_everything_else_passes_through(ca_file: str) -> None:
    given = {
        "host": "db.example.com",
        "port": "6432",
        "user": "app",
        "dbname": "appdb",
        "sslcert": "/c/client.crt",
        "sslkey": "/c/client.key",
        "sslpassword": "key-pass",
        "sslcrl": "/c/crl.pem",
        "sslsni": "0",
        "target_session_attrs": "read-write",
        "options": "-c search_path=app",
        "connect_timeout": "7",
        "application_name": "svc",
        "sslrootcert": ca_file,
    }
    assert final(**given) == {
        **given,
        "sslmode": "verify-full",
        "gssencmode": "disable",
        "ssl_min_protocol_version": "TLSv1.2",
    }


def test_host_names_are_not_normalised(ca_file: str) -> None:
    host = "DB.Example.COM.,10.0.0.1,db-2.example.com"
    assert final(host=host, sslrootcert=ca_file)["host"] == host


@pytest.mark.parametrize(
    "conninfo",
    [
        "host=/var/run/postgresql",
        "host=@abstract-socket",
        "host=db.example.com,/tmp",
        "postgresql:///app?host=/tmp",
        "dbname=app",  # no host at all: libpq's default is a socket
        "",
    ],
)
def test_unix_sockets_are_refused(conninfo: str, ca_file: str) -> None:
    with pytest.raises(ConfigurationError, match="Unix-domain socket") as info:
        safepg.secure_conninfo(conninfo, sslrootcert=ca_file)
    assert "allow_unencrypted_unix_socket=True" in str(info.value)


def test_pghost_socket_is_refused(ca_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "/var/run/postgresql")
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.secure_conninfo(sslrootcert=ca_file)


def test_unix_socket_opt_in(ca_file: str) -> None:
    params = final("host=/tmp", sslrootcert=ca_file, allow_unencrypted_unix_socket=True)
    assert params["host"] == "/tmp"
    assert params["sslmode"] == "verify-full"


@pytest.mark.parametrize(
    "conninfo", ["hostaddr=10.0.0.1", "host=db.example.com,, hostaddr=10.0.0.1,10.0.0.2"]
)
def test_hostaddr_without_host_is_refused(conninfo: str, ca_file: str) -> None:
    with pytest.raises(ConfigurationError, match="without a host name") as info:
        safepg.secure_conninfo(conninfo.replace(",,", ","), sslrootcert=ca_file)
    assert "host=db.example.com hostaddr=10.0.0." in str(info.value)


def test_hostaddr_with_host_is_kept(ca_file: str) -> None:
    params = final(host="db.example.com", hostaddr="127.0.0.1", sslrootcert=ca_file)
    assert (params["host"], params["hostaddr"]) == ("db.example.com", "127.0.0.1")


def test_multi_host_is_kept(ca_file: str) -> None:
    params = final("host=a.example.com,b.example.com port=5432,5433", sslrootcert=ca_file)
    assert params["host"] == "a.example.com,b.example.com"
    assert params["port"] == "5432,5433"


def test_safepg_options_never_collide_with_libpq_keywords() -> None:
    keywords = {opt.keyword.decode() for opt in pq.Conninfo.get_defaults()}
    assert "allow_unencrypted_unix_socket" not in keywords


@pytest.mark.parametrize(
    ("conninfo", "kwargs", "match"),
    [
        ("host=db.example.com nosuchoption=1", {}, 'unknown option "nosuchoption": libpq has'),
        ("host=db.example.com password=x nosuchoption=1", {}, "unknown option \\(its name is not"),
        ("host=db.example.com", {"nosuchoption": "1"}, 'unknown option "nosuchoption"'),
        ("host=db.example.com sslmode=sideways", {}, "invalid sslmode value"),
        ("host='unterminated", {}, "unterminated quoted string"),
        ("postgresql://u@[::1/db", {}, "IPv6"),
        ("host=a\x00.example.com", {}, "NUL byte"),
        ("", {"host": "a\x00.example.com"}, "NUL byte"),
        ("", {"host": "\udcff.example.com"}, "not valid UTF-8"),
        ("host=db.example.com", {"sslrootcert": Path("/etc/ca\x00.pem")}, "NUL byte"),
        (
            "host=db.example.com port=5432,5433,5434",
            {},
            "could not match 3 port numbers to 1 hosts",
        ),
        ("service=nosuchservice", {}, 'definition of service "nosuchservice" not found'),
        ("host=db.example.com ssl_min_protocol_version=TLSv9", {}, "ssl_min_protocol_version"),
    ],
)
def test_bad_input_is_a_configuration_error(
    conninfo: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        safepg.secure_conninfo(conninfo, **kwargs)


def test_long_values_pass_through(ca_file: str) -> None:
    name = "a" * 5000
    assert (
        final(host="db.example.com", application_name=name, sslrootcert=ca_file)["application_name"]
        == name
    )


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://app:s3cr%t-Pa55@db.example.com/app",
        "postgresql://app:s3cr-Pa55@[::1/app",
        "postgresql://app@db.example.com/app?password=s3cr-Pa55&bad",
        "host=db.example.com password=s3cr-Pa55 nosuch=1",
        "host=db.example.com password='s3cr-Pa55",
        "host=db.example.com password s3cr-Pa55",
    ],
)
def test_parse_errors_never_show_the_password(conninfo: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        safepg.secure_conninfo(conninfo)
    for text in (str(info.value), repr(info.value)):
        assert "s3cr" not in text
        assert "Pa55" not in text
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # libpq's error quoted the input: not kept at all


def test_errors_are_psycopg_operational_errors() -> None:
    import psycopg

    for cls in (
        safepg.ConfigurationError,
        safepg.ConnectionSecurityError,
        safepg.HostnameMismatchError,
        safepg.UntrustedCertificateError,
        safepg.CertificateExpiredError,
        safepg.SSLNotSupportedError,
        safepg.InsecureConnectionError,
    ):
        assert issubclass(cls, safepg.SafePGError)
        assert issubclass(cls, psycopg.OperationalError)
    assert issubclass(safepg.CertificateExpiredError, safepg.UntrustedCertificateError)


def test_no_network_io_while_hardening(ca_file: str) -> None:
    # A listening socket that nobody may connect to: hardening must not touch it.
    import socket

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.setblocking(False)
        port = ls.getsockname()[1]
        safepg.secure_conninfo(host="127.0.0.1", port=port, sslrootcert=ca_file)
        with pytest.raises(BlockingIOError):
            ls.accept()


def test_environment_is_untouched(ca_file: str) -> None:
    before = dict(os.environ)
    final(host="db.example.com", sslrootcert=ca_file)
    assert dict(os.environ) == before


# -- booleans from strings (URLs, the environment) are parsed strictly --------------------------


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "FALSE", " Off "])
def test_false_strings_refuse_a_socket(value: Any, tmp_path: Path) -> None:
    """Security review item 3: "false" from a URL query once enabled the socket opt-in."""
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.secure_conninfo(host=str(tmp_path), allow_unencrypted_unix_socket=value)


@pytest.mark.parametrize("value", ["maybe", "", "2", "tru", "none", 2, 1.0, [], b"true"])
def test_other_values_are_refused(value: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="allow_unencrypted_unix_socket must be true"):
        safepg.secure_conninfo(host=str(tmp_path), allow_unencrypted_unix_socket=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["fast_path", "direct_tls"])
def test_connect_options_are_strict(option: str) -> None:
    options: dict[str, Any] = {option: "maybe"}  # as a URL's query string gives it
    with pytest.raises(ConfigurationError, match=f"{option} must be true or false"):
        safepg.connect("host=db.example.com sslrootcert=system", **options)


@pytest.mark.parametrize(
    ("value", "enabled"), [("0", False), ("off", False), ("1", True), ("", True), ("yes", True)]
)
def test_fast_path_switch_is_strict(
    value: str, enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safepg import _fastpath

    monkeypatch.setenv("SAFEPG_FAST_PATH", value)
    assert _fastpath.enabled(None) is enabled
    assert _fastpath.enabled("false") is False  # the argument wins, parsed the same way
    monkeypatch.setenv("SAFEPG_FAST_PATH", "disabled")
    with pytest.raises(ConfigurationError, match="SAFEPG_FAST_PATH \\(environment\\) must be"):
        _fastpath.enabled(None)


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://app:p@ss:Tr0ub4dor@db.example.com/app",
        "postgresql://app:p@ss@db.example.com/app",
        "host=db.example.com port=Tr0ub4dor",
        "host=db.example.com connect_timeout=inf",
        "host=db.example.com connect_timeout=2.5",
    ],
)
def test_odd_ports_and_timeouts_are_refused_without_echo(conninfo: str) -> None:
    """Security review item 5: a bare ValueError holding part of the password, an
    OverflowError for connect_timeout=inf."""
    with pytest.raises(ConfigurationError) as info:
        safepg.connect(conninfo, sslrootcert="system")
    for text in (str(info.value), repr(info.value)):
        assert "Tr0ub4dor" not in text
        assert "ss@" not in text
    assert info.value.__context__ is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:@Tr0ub4dor/@db.example.com:5432/app",  # host would be Tr0ub4dor
        "postgresql://app:@Tr0ub4dor:@db.example.com/app",
        "postgresql://app:,Tr0ub4dor/@db.example.com/app",
        "postgres://app:p@Tr0ub4dor@db.example.com/app",
        "postgresql://db.example.com/app/Tr0ub4dor",
    ],
)
def test_urls_that_spill_the_password_are_refused_without_echo(url: str) -> None:
    """An unencoded '@' or '/' in a URL's password makes libpq take part of it as the host
    (looked up in DNS, shown in messages) or the database: refused before libpq sees it."""
    with pytest.raises(ConfigurationError, match="Percent-encode") as info:
        safepg.connect(url, sslrootcert="system")
    assert "Tr0ub4dor" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:p%40ss%2Fw%3Ard@db.example.com/app",
        "postgresql://app:pa:ss@db.example.com:5432/app?application_name=a@b/c",
        "postgresql:///app?host=db.example.com",
        "postgresql://[::1]:5432/app",
    ],
)
def test_well_formed_urls_pass(url: str) -> None:
    assert "sslmode=verify-full" in safepg.secure_conninfo(url, sslrootcert="system")


@pytest.mark.parametrize(
    "conninfo",
    [
        'postgresql://app:s3cr"etPART%!pw@db.example.com/app',
        'postgresql://app:ab"SECRETTAIL xyz@db.example.com/app',
        "password='it'sSECRET=1' host=db.example.com",
    ],
)
def test_parse_errors_never_show_text_after_a_quote_in_the_password(conninfo: str) -> None:
    """Review of round 2: a quote in the password broke the pairing of libpq's quotes.

    (libpq 15 accepts the space in the second URL; 18 refuses it.)"""
    message = ""
    try:
        safepg.secure_conninfo(conninfo, sslrootcert="system")
    except ConfigurationError as ex:
        message = str(ex)
    assert "SECRET" not in message
    assert "etPART" not in message


def test_connect_timeout_from_a_service_file_is_what_psycopg_gets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg enforces connect_timeout itself and never reads service files: the value libpq
    resolved is pinned, or psycopg waits its own 130 s, far past safepg's deadline."""
    services = tmp_path / "pg_service.conf"
    services.write_text("[slow]\nhost=db.example.com\nconnect_timeout=2\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    plan = _params.build_plan("service=slow sslrootcert=system", {})
    assert plan.params["connect_timeout"] == "2"
    assert plan.timeout == 2.0


@pytest.mark.parametrize("host", ["a" * 64 + ".example.com", "db..example.com", "ä" * 70])
def test_hosts_idna_cannot_encode_are_refused(host: str) -> None:
    with pytest.raises(ConfigurationError, match="a host name is not one"):
        safepg.connect(host=host, sslrootcert="system")


# -- decisions the mutation stage showed untested (mutation/RESULTS.md) -----------------------


def test_each_host_of_a_list_gets_its_own_port() -> None:
    plan = _params.build_plan("host=a.example.com,b.example.com port=5433,5434", {})
    assert [(t.host, t.port) for t in plan.targets] == [
        ("a.example.com", "5433"),
        ("b.example.com", "5434"),
    ]
    plan = _params.build_plan("host=a.example.com,b.example.com port=5433", {})
    assert [t.port for t in plan.targets] == ["5433", "5433"]


def test_a_host_already_checked_does_not_let_the_next_one_pass() -> None:
    _params.build_plan("host=db.example.com", {})  # checked once, remembered as good
    with pytest.raises(ConfigurationError, match="a host name is not one"):
        _params.build_plan("host=db.example.com,evil@attacker.example", {})


def test_the_hosts_found_good_are_bounded() -> None:
    _params._GOOD_HOSTS.clear()
    sizes = []
    for n in range(300):
        _params._targets({"host": f"h{n}.example.com"}, False)
        sizes.append(len(_params._GOOD_HOSTS))
    assert max(sizes) == 256  # kept up to 256, then started again
    assert sizes[:3] == [1, 2, 3]


@pytest.mark.parametrize(
    ("how", "chosen"),
    [("none", False), ("env", True), ("env-default", True), ("keyword", True)],
)
def test_the_callers_choice_of_negotiation_is_recorded(
    monkeypatch: pytest.MonkeyPatch, how: str, chosen: bool
) -> None:
    # A choice of the SSLRequest or direct TLS, even of libpq's default, is the caller's: the
    # fast path never replaces it with a direct TLS it learned.
    kwargs: dict[str, Any] = {}
    if how == "env":
        monkeypatch.setenv("PGSSLNEGOTIATION", "direct")
    elif how == "env-default":
        monkeypatch.setenv("PGSSLNEGOTIATION", "postgres")
    elif how == "keyword":
        kwargs["sslnegotiation"] = "postgres"
    if how != "none" and "sslnegotiation" not in {
        o.keyword.decode() for o in pq.Conninfo.get_defaults()
    }:
        pytest.skip("this libpq has no sslnegotiation (libpq 17+)")
    plan = _params.build_plan("host=db.example.com sslmode=verify-full", kwargs)
    assert plan.negotiation_chosen is chosen


def test_a_service_files_negotiation_is_the_callers_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if "sslnegotiation" not in {o.keyword.decode() for o in pq.Conninfo.get_defaults()}:
        pytest.skip("this libpq has no sslnegotiation (libpq 17+)")
    services = tmp_path / "services.conf"
    services.write_text("[app]\nhost=db.example.com\nsslmode=verify-full\nsslnegotiation=direct\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    assert _params.build_plan("service=app", {}).negotiation_chosen is True


def test_a_socket_is_refused_with_what_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="is a Unix-domain socket directory"):
        _params.build_plan("host=/var/run/postgresql", {})
    monkeypatch.delenv("PGHOST", raising=False)
    with pytest.raises(ConfigurationError, match="no host was given"):
        _params.build_plan("dbname=app", {})
