"""``safepg check``, ``inspect``, ``ca`` and ``env`` against real servers: exit codes and JSON."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from safepg._cli import main
from safepg._cli._output import Output
from safepg._cli.inspect import host_port
from safepg.testing import CertificateAuthority, PostgresServer

from .cli_json import run_json
from .conftest import CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
CERT_KEYS = {"subject", "issuer", "names", "not_before", "not_after", "days_left"}
CHECK_KEYS = {
    "schema", "ok", "exit_code", "host", "hostaddr", "port", "client", "trust", "certificates",
    "server", "error",
}  # fmt: skip
INSPECT_KEYS = {
    "schema", "ok", "exit_code", "host", "port", "address", "negotiation", "reachable",
    "connection", "tls",
    "certificates", "trust", "verified_by", "hostname", "rds_ca", "problems", "warnings", "advice",
    "error",
}  # fmt: skip


def arrange(case: str, certs: CertificateShop, rogue_ca: CertificateAuthority) -> None:
    """Have the server present the certificate a failure case needs."""
    days = {"expired": -2, "expiring": 10}.get(case)
    if days is not None:
        when = NOW + dt.timedelta(days=days)
        certs.present("localhost", ip_addresses=["127.0.0.1"], not_after=when)
    elif case == "untrusted":
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)


def inspect_args(server: PostgresServer, host: str = "localhost") -> list[str]:
    return [
        "inspect",
        f"{host}:{server.port}",
        "--hostaddr",
        "127.0.0.1",
        "--sslrootcert",
        str(server.ca_path),
    ]


# -- check -------------------------------------------------------------------------------------


def test_check_good(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "check", server.url())
    assert code == 0
    assert set(data) == CHECK_KEYS
    assert data["schema"] == "safepg.check/1"
    assert data["ok"] is True
    assert data["client"]["verified"] is True
    assert data["client"]["sslmode"] == "verify-full"
    assert data["trust"]["origin"] == "sslrootcert"
    assert set(data["certificates"][0]) == CERT_KEYS
    assert "localhost" in data["certificates"][0]["names"]
    assert data["server"]["ssl"] is True
    assert data["server"]["user"] == server.user
    assert data["server"]["protocol"] == data["client"]["protocol"]
    assert server.password not in json.dumps(data)


def test_check_human(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", server.conninfo()]) == 0
    out = capsys.readouterr().out
    assert "safepg check: verified" in out
    assert "pg_stat_ssl joined with pg_stat_activity" in out
    assert "\033[" not in out  # not a terminal: no colour
    assert server.password not in out


def test_check_honours_timeout(stalled_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(
        capsys, "check", f"host=localhost hostaddr=127.0.0.1 port={stalled_port}", "--timeout", "2"
    )
    assert code == 1
    assert "timeout" in data["error"]["message"].lower()


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_good(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, *inspect_args(server))
    assert code == 0
    assert set(data) == INSPECT_KEYS
    assert data["schema"] == "safepg.inspect/1"
    assert data["tls"] is True
    assert data["trust"]["verifies"] is True
    assert data["hostname"] == {
        "host": "localhost",
        "matches": True,
        "names": ["localhost", "127.0.0.1"],
    }
    assert data["address"] == "127.0.0.1"
    assert data["negotiation"] == "sslrequest"
    assert data["problems"] == []


def test_inspect_needs_no_login(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    # No user, no password: the handshake is all it needs, even from a server that would
    # reject the login.
    assert main(inspect_args(server)) == 0
    out = capsys.readouterr().out
    assert "no login" in out
    assert "result           OK" in out


@pytest.mark.parametrize(
    ("case", "code", "problem"),
    [
        ("wrong-name", 3, 'does not name "db.example.com"'),
        ("expired", 3, "expired on"),
        ("expiring", 4, "expires in"),
        ("untrusted", 3, "is not among the trust anchors"),
        ("ssl-off", 3, "does not offer TLS"),
        ("closed-port", 1, "cannot reach"),
    ],
)
def test_inspect_findings(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    closed_port: int,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: int,
    problem: str,
) -> None:
    args = inspect_args(server)
    if case == "wrong-name":
        args = inspect_args(server, "db.example.com")
    elif case == "expired":
        certs.present("localhost", ip_addresses=["127.0.0.1"], not_after=NOW - dt.timedelta(days=2))
    elif case == "expiring":
        certs.present(
            "localhost", ip_addresses=["127.0.0.1"], not_after=NOW + dt.timedelta(days=10)
        )
    elif case == "untrusted":
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    elif case == "closed-port":
        args[1] = f"localhost:{closed_port}"
    if case == "ssl-off":
        with server.ssl_disabled():
            got, data = run_json(capsys, *args)
    else:
        got, data = run_json(capsys, *args)
    assert got == code
    findings = " ".join(data["problems"] + data["warnings"])
    assert problem in findings
    if case == "expiring":
        assert data["ok"] is True
        assert 8 <= data["certificates"][0]["days_left"] <= 10
    if case == "untrusted":
        assert data["verified_by"] is None
        assert any("sslrootcert" in a for a in data["advice"])


def test_inspect_names_the_source_that_would_verify(
    server: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trust chosen does not verify; the OS store (here: SSL_CERT_FILE) would.
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    rogue = CertificateAuthority("someone else").write_cert(server.directory / "other-ca.pem")
    args = inspect_args(server)
    args[-1] = str(rogue)
    code, data = run_json(capsys, *args)
    assert code == 3
    assert data["verified_by"]["origin"] == "os-store"
    assert any("It verifies against OS trust store" in a for a in data["advice"])


def test_inspect_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", "host:notaport"])
    assert info.value.code == 2
    assert "HOST[:PORT]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "expected"),
    [("db", ("db", 5432)), ("db:6432", ("db", 6432)), ("[::1]:6432", ("::1", 6432))],
)
def test_host_port(value: str, expected: tuple[str, int]) -> None:
    assert host_port(value) == expected


# -- ca and env --------------------------------------------------------------------------------


def test_ca(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "--host", "mydb.abc.eu-west-1.rds.amazonaws.com"]) == 0
    assert capsys.readouterr().out.strip().endswith("rds-global-bundle.pem")
    assert main(["ca", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "safepg.ca/1"
    assert data["origin"] in ("os-store", "certifi")


def test_ca_with_psql(
    server: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGSSLROOTCERT=$(safepg ca --host H) psql "host=H sslmode=verify-full ..." works."""
    psql = server.bindir / "psql"
    if not psql.exists():
        pytest.skip("no psql next to the server binaries")
    # The test CA stands in for the OS store: libpq itself would not look at SSL_CERT_FILE.
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    assert main(["ca", "--host", "localhost"]) == 0
    ca = capsys.readouterr().out.strip()
    assert ca == str(server.ca_path)
    proc = subprocess.run(
        [str(psql), "-XAtc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
         f"host=localhost port={server.port} user={server.user} dbname={server.dbname} "
         "sslmode=verify-full"],
        env={**os.environ, "PGSSLROOTCERT": ca, "PGPASSWORD": server.password},
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "t"


def test_env(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", server.url()]) == 0
    out = capsys.readouterr().out
    assert "export PGSSLMODE=verify-full" in out
    assert f"export PGSSLROOTCERT={server.ca_path}" in out
    assert server.password not in out
    # The exports work for a real libpq client: psycopg with no sslmode of its own.
    env = dict(os.environ)
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    code = (
        "import psycopg, sys\n"
        "with psycopg.connect(sys.argv[1]) as c:\n"
        "    print(c.pgconn.ssl_in_use, c.info.get_parameters())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, server.conninfo(sslrootcert=None)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True")


def test_as_module_json(server: PostgresServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safepg", "check", "--json", server.conninfo()],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    proc = subprocess.run(
        [sys.executable, "-m", "safepg", "check", server.conninfo(host="db.example.com",
         hostaddr="127.0.0.1")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "HostnameMismatchError" in proc.stderr


def test_no_color_and_tty(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Output("x", stream=Tty()).good("x") == "\033[32mx\033[0m"  # type: ignore[arg-type]
    monkeypatch.setenv("NO_COLOR", "1")
    assert Output("x", stream=Tty()).good("x") == "x"  # type: ignore[arg-type]


def test_check_failure_text_cannot_forge_output_lines(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server quotes the user name in its refusal: a line break there must not start a line
    # of safepg's output that reads like its own.
    forged = "nobody\nverified TLSv1.3 (TLS_AES_256_GCM_SHA384) to db:5432"
    assert main(["check", server.conninfo(user=forged)]) == 1
    err = capsys.readouterr().err
    assert "password authentication failed" in err or "does not exist" in err
    assert not any(line.startswith("verified") for line in err.splitlines())
