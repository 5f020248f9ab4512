"""What the command line says, and when it refuses: `ca` for providers whose CA must be given,
``-v``, ``inspect``'s reasons, the command line's own wording, and small things of layout."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest

from safepg import _cli, _fastpath, providers
from safepg._cli import main
from safepg.testing import CertificateAuthority, PostgresServer

from .cli_json import run_json

# A host of each provider whose CA safepg neither ships nor fetches, and no OS store holds.
NOT_BUNDLED = {
    "rds-china": "mydb.abc.cn-north-1.rds.amazonaws.com.cn",
    "crunchy-bridge": "p.abc.db.postgresbridge.com",
}
# A host of each provider whose CA safepg fetches from its API (tests/test_fetch.py).
FETCHED = {
    "cloud-sql": "my-instance.abc.us-central1.sql.goog",
    "digitalocean": "db-1-do-user-1.b.db.ondigitalocean.com",
    "aiven": "pg-project.aivencloud.com",
}


def test_every_not_bundled_provider_is_covered() -> None:
    keys = {p.key for p in providers.PROFILES if p.trust == "not-bundled"}
    assert keys == set(NOT_BUNDLED)
    assert {p.key for p in providers.PROFILES if p.trust == "fetched"} == set(FETCHED)


# -- ca and env: no path that cannot work (item 3) ------------------------------------------------


@pytest.mark.parametrize("key", sorted(NOT_BUNDLED))
def test_ca_refuses_a_host_whose_ca_must_be_given(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    host = NOT_BUNDLED[key]
    profile = providers.profile_for_host(host)
    assert profile is not None
    assert profile.key == key
    assert main(["ca", "--host", host]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # PGSSLROOTCERT=$(safepg ca --host H) gets nothing, and the shell sees 2
    assert profile.untrusted_hint(host) in err
    assert f"{host} is a host of {profile.name}," in err
    code, data = run_json(capsys, "ca", "--host", host)
    assert (code, data["path"]) == (2, None)
    assert profile.untrusted_hint(host) in data["error"]["message"]


def test_ca_for_such_a_host_prints_the_ca_you_named(
    server: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", str(server.ca_path))
    assert main(["ca", "--host", FETCHED["cloud-sql"]]) == 0
    assert capsys.readouterr().out.strip() == str(server.ca_path)


def test_ca_for_a_public_ca_provider_prints_the_os_store(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["ca", "--host", "ep-x.us-east-2.aws.neon.tech"]) == 0
    assert os.path.isfile(capsys.readouterr().out.strip())


def test_env_refuses_such_a_host_too(capsys: pytest.CaptureFixture[str]) -> None:
    host = NOT_BUNDLED["crunchy-bridge"]
    assert main(["env", f"postgresql://app@{host}:25060/defaultdb"]) == 2
    out, err = capsys.readouterr()
    assert "export" not in out
    assert "Connection page" in err


def test_env_without_the_provider_credential(capsys: pytest.CaptureFixture[str]) -> None:
    """A host whose CA safepg fetches, without the credential: which one, and the CLI way."""
    host = FETCHED["digitalocean"]
    assert main(["env", f"postgresql://app@{host}:25060/defaultdb"]) == 2
    out, err = capsys.readouterr()
    assert "export" not in out
    assert "DIGITALOCEAN_TOKEN" in err
    assert "doctl databases get-ca" in err


# -- -v: safepg's decisions (item 4) -------------------------------------------------------------


def test_verbose_check_shows_trust_and_fast_path(
    server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
    target = server.conninfo(sslrootcert=str(bundle))
    where = f"127.0.0.1:{server.port}"

    assert main(["-v", "check", target]) == 0  # cold
    err = capsys.readouterr().err
    assert f"safepg: debug: trust anchors: {bundle}, named by the conninfo string" in err
    assert re.search(rf"fast path learned {where}: 1 anchor\(s\) of the \d+ in ", err)
    if _fastpath.libpq_has_direct():  # the server's version taught it (the session's is < 17)
        assert f"learned that {where} does not take direct TLS" in err

    for _ in range(2):  # warm: the first may read the disk (learning direct TLS reset memory)
        assert main(["check", target, "-v"]) == 0
    assert "fast path: warm (in memory)" in capsys.readouterr().err

    _fastpath.clear_memory()  # a new process, as far as the fast path knows
    assert main(["check", target, "--verbose"]) == 0
    assert f"fast path: warm (disk cache) for {where}" in capsys.readouterr().err

    assert main(["check", target]) == 0  # without -v: no decisions shown
    err = capsys.readouterr().err
    assert "debug" not in err
    assert server.password not in err


def test_verbose_says_why_there_is_no_fast_path(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-v", "check", server.conninfo(), "--json"]) == 0
    err = capsys.readouterr().err
    assert f"trust anchors: {server.ca_path}, named by the conninfo string" in err
    if not _fastpath.libpq_has_direct():  # one CA and no direct TLS to learn
        assert f"fast path not used: {server.ca_path} holds one certificate" in err


def test_verbose_ca_explains_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "ca", "--host", "db.x.eu-west-1.rds.amazonaws.com"]) == 0
    err = capsys.readouterr().err
    assert "trust anchors for db.x.eu-west-1.rds.amazonaws.com: bundled Amazon RDS roots" in err
    assert "(Amazon RDS / Aurora)" in err


# -- inspect: why it failed (item 5) -------------------------------------------------------------


def test_inspect_direct_against_a_server_before_17(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    if server.major_version >= 17:
        pytest.skip("the session's server takes direct TLS")
    args = ["inspect", f"localhost:{server.port}", "--hostaddr", "127.0.0.1", "--direct"]
    code, data = run_json(capsys, *args)
    assert code == 3
    assert (data["reachable"], data["tls"], data["negotiation"]) == (True, False, "direct")
    assert "needs PostgreSQL 17 or later" in data["problems"][0]
    assert "the SSLRequest works" in data["problems"][0]
    assert any("without --direct" in a for a in data["advice"])
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "direct TLS       not accepted" in out
    assert "unreachable" not in out


def test_inspect_and_check_say_a_name_does_not_resolve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, data = run_json(capsys, "inspect", "no-such-host.invalid", "--timeout", "5")
    assert (code, data["reachable"]) == (1, False)
    assert 'the host name "no-such-host.invalid" does not resolve' in data["problems"][0]
    code, data = run_json(capsys, "check", "host=no-such-host.invalid user=x", "--timeout", "5")
    assert code == 1
    assert "resolve" in data["error"]["message"]
    assert data["host"] == "no-such-host.invalid"


def test_inspect_names_a_refused_connection(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, data = run_json(capsys, "inspect", f"127.0.0.1:{port}")
    assert code == 1
    assert data["problems"] == [
        f"cannot reach 127.0.0.1:{port}: connection refused (nothing listens on that port, or a "
        "firewall rejects the connection)"
    ]
    assert (data["reachable"], data["connection"]) == (False, "refused")


# -- the command line's own words (item 6) -------------------------------------------------------


def test_inspect_names_its_option_not_a_keyword_argument(
    server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["inspect", f"localhost:{server.port}", "--hostaddr", "127.0.0.1", "--sslrootcert"]
    assert main([*args, str(server.ca_path)]) == 0
    out = capsys.readouterr().out
    assert "trust anchors    the --sslrootcert file: verifies the chain" in out
    assert main([*args, str(tmp_path / "missing.pem")]) == 2
    out, err = capsys.readouterr()
    assert "named by --sslrootcert, does not exist" in err
    assert "keyword argument" not in out + err


def test_check_offers_its_own_option_for_a_socket(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = server.conninfo(host=str(server.socket_dir))
    assert main(["check", target]) == 2
    err = capsys.readouterr().err
    assert "run again with --allow-unencrypted-unix-socket" in err
    assert "allow_unencrypted_unix_socket=True" not in err

    code, data = run_json(capsys, "check", target, "--allow-unencrypted-unix-socket")
    assert code == 0
    client = {k: v for k, v in data["client"].items() if k != "ssl_library"}
    assert client == {
        "encrypted": False, "verified": False, "local_socket": True, "sslmode": "verify-full",
        "protocol": None, "cipher": None, "bits": None,
    }  # fmt: skip
    assert data["port"] == server.port
    assert data["certificates"] == []
    assert data["server"]["ssl"] is False
    assert main(["check", target, "--allow-unencrypted-unix-socket"]) == 0
    out = capsys.readouterr().out
    assert "safepg check: local socket, not encrypted" in out
    assert server.password not in out


# -- layout (item 9) ---------------------------------------------------------------------------


def test_check_headline_and_no_empty_lines(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", server.conninfo()]) == 0
    out = capsys.readouterr().out
    headline = out.splitlines()[0]
    assert headline.startswith("safepg check: verified TLSv1.")
    assert "verified, verified" not in out
    # No field without a value (an unset application_name printed one).
    assert [line for line in out.splitlines() if line.endswith(" ")] == []
    assert "application name" not in out


def test_counts_are_singular_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = CertificateAuthority("one root").write_cert(tmp_path / "one.pem")
    assert main(["bundles", "check", str(one)]) == 0
    out = capsys.readouterr().out
    assert f"{one}: 1 certificate, all CAs" in out


def test_providers_file_list_is_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["providers"]) == 0
    out = capsys.readouterr().out
    rows = out.split("CA files", 1)[1].splitlines()[1:]
    columns = {re.search(r"\.pem +", row).end() for row in rows if ".pem" in row}  # type: ignore[union-attr]
    assert len(columns) == 1, rows
    assert "1 certificate, shipped" in out


def test_every_option_and_argument_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(_cli.parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit):
        main(["ca", "--help"])
    assert re.search(r"--port PORT +the server's port", capsys.readouterr().out)


@pytest.mark.matrix
def test_inspect_direct_against_postgresql_18(capsys: pytest.CaptureFixture[str]) -> None:
    with PostgresServer(version=18) as pg18:
        args = ["inspect", f"localhost:{pg18.port}", "--hostaddr", "127.0.0.1", "--direct"]
        code, data = run_json(capsys, *args, "--sslrootcert", str(pg18.ca_path))
    assert code == 0
    assert (data["negotiation"], data["tls"], data["problems"]) == ("direct", True, [])
    assert data["trust"]["verifies"] is True


# -- env: nothing psql would use instead of the exports --------------------------------------------

OVERRIDING = [
    "sslmode=disable",
    "sslmode=allow",
    "sslmode=prefer",
    "sslmode=require",
    "sslmode=verify-ca",
    "gssencmode=prefer",
    "gssencmode=require",
    "ssl_min_protocol_version=TLSv1",
    "ssl_min_protocol_version=TLSv1.1",
]


@pytest.mark.parametrize("setting", OVERRIDING)
def test_env_refuses_a_url_setting_psql_would_use_instead(
    setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # libpq takes the URL's own keyword over the environment: `psql "$URL"` after these
    # exports would connect with the URL's setting.
    key = setting.partition("=")[0]
    assert main(["env", f"postgresql://app@db.example.com/app?{setting}"]) == 2
    out, err = capsys.readouterr()
    assert "export" not in out
    assert f"Remove {key} from the URL" in err
    assert "raised to" not in err  # psql would not raise it
    code, data = run_json(capsys, "env", f"host=db.example.com {setting}")
    assert (code, data["env"]) == (2, None)
    assert f"Remove {key} from the URL" in data["error"]["message"]


@pytest.mark.parametrize("setting", ["sslmode=require", "gssencmode=prefer", "sslrootcert=system"])
def test_env_refuses_a_service_setting_psql_would_use_instead(
    setting: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[weak]\nhost=db.example.com\n{setting}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    key = setting.partition("=")[0]
    for argv in (["env", "service=weak"], ["env", "postgresql:///app?service=weak"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "export" not in out
        assert f"Remove {key} from service 'weak' in the service file" in err
    monkeypatch.setenv("PGSERVICE", "weak")
    assert main(["env", "postgresql://db.example.com/app"]) == 2
    assert f"Remove {key} from service 'weak'" in capsys.readouterr().err


def test_env_lets_exports_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The shell's own weak PG* variables are what the exports replace: no refusal there.
    monkeypatch.setenv("PGSSLMODE", "require")
    monkeypatch.setenv("PGGSSENCMODE", "prefer")
    assert main(["env", "postgresql://db.example.com/app"]) == 0
    assert "export PGSSLMODE=verify-full" in capsys.readouterr().out


def test_env_refuses_a_socket_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "host=/tmp dbname=app"]) == 2
    out, err = capsys.readouterr()
    assert "export" not in out
    assert "never encrypts" in err


def test_env_refuses_a_socket_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGHOST", "/var/run/postgresql")
    assert main(["env"]) == 2
    assert "never encrypts" in capsys.readouterr().err
    monkeypatch.delenv("PGHOST")
    services = tmp_path / "pg_service.conf"
    services.write_text("[local]\nhost=/tmp\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "local")
    assert main(["env"]) == 2
    assert "never encrypts" in capsys.readouterr().err
    monkeypatch.delenv("PGSERVICE")
    assert main(["env"]) == 0  # no host anywhere: psql will be given one
