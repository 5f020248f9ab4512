"""The "safepg.django" backend against the real TLS server: migrate, write and read through
safepg, with psycopg 3, with Django's pool, and with psycopg2; weak settings raised; attacks
refused with safepg's errors under Django's.

Django is configured once, in this process, with one alias per case and the example project's
app (examples/django_project/notes). The psycopg2 case runs in a subprocess: Django uses psycopg2
only when it cannot import psycopg 3, which safepg itself needs, so that process hides psycopg 3
from Django after safepg has loaded it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

import safepg
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

django = pytest.importorskip("django")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "django_project"


def _database(server: PostgresServer, **options: Any) -> dict[str, Any]:
    return {
        "ENGINE": "safepg.django",
        "NAME": server.dbname,
        "USER": server.user,
        "PASSWORD": server.password,
        "HOST": options.pop("host", server.host),
        "PORT": str(server.port),
        "OPTIONS": {"sslrootcert": str(server.ca_path), **options},
    }


TOKEN_CALLS: list[object] = []


def _token_database(server: PostgresServer, **options: Any) -> dict[str, Any]:
    def token(target: safepg.ConnectTarget) -> str:  # a cloud provider would mint one here
        TOKEN_CALLS.append(target)
        return server.password

    return {**_database(server, **options), "PASSWORD": token}


@pytest.fixture(scope="module")
def connections(server: PostgresServer) -> Iterator[Any]:
    from django.conf import settings

    if not settings.configured:
        sys.path.insert(0, str(EXAMPLE))
        settings.configure(
            INSTALLED_APPS=["notes"],
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            DATABASES={
                "default": _database(server, application_name="safepg-django"),
                "pooled": _database(server, pool={"min_size": 1, "max_size": 2}),
                "weak": _database(server, sslmode="require"),
                "token": _token_database(server),
                "token_pooled": _token_database(server, pool={"min_size": 0, "max_size": 2}),
                "wrong_name": _database(
                    server, host="wrong.example", hostaddr="127.0.0.1", sslmode="prefer"
                ),
            },
        )
        django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", database="default", verbosity=0)
    yield connections
    connections.close_all()
    for alias in ("pooled", "token_pooled"):
        pooled: Any = connections[alias]
        pooled.close_pool()


def test_migrate_write_and_read(connections: Any) -> None:
    from notes.models import Note

    Note.objects.create(text="through safepg")
    assert Note.objects.filter(text="through safepg").exists()
    conn = connections["default"]
    assert type(conn).__module__ == "safepg.django.base"
    report = safepg.check(conn.connection)
    assert report.verified
    assert report.trust is not None  # opened by safepg.connect, which remembers its trust
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone() == ("safepg-django",)


def test_pool_connections_come_through_safepg(connections: Any) -> None:
    from notes.models import Note

    Note.objects.using("pooled").create(text="pooled")
    conn = connections["pooled"]
    assert conn.pool is not None
    assert type(conn.connection).__name__ == "VerifiedConnection"
    report = safepg.check(conn.connection)
    assert report.verified
    assert report.trust is not None
    assert Note.objects.using("pooled").filter(text="pooled").exists()
    conn.close()  # back to the pool


@pytest.mark.parametrize("alias", ["token", "token_pooled"])
def test_a_password_callable_is_called_for_each_new_connection(
    connections: Any, alias: str
) -> None:
    TOKEN_CALLS.clear()
    conn = connections[alias]
    for _ in range(2):
        conn.ensure_connection()
        assert safepg.check(conn.connection).verified
        conn.connection.close()  # gone: the next one is a new physical connection
        conn.connection = None
    assert len(TOKEN_CALLS) == 2


def test_weaker_sslmode_in_options_is_raised(
    connections: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conn = connections["weak"]
    with caplog.at_level(logging.INFO, logger="safepg"):
        conn.ensure_connection()
    assert safepg.check(conn.connection).sslmode == "verify-full"
    assert (
        'sslmode=require (from OPTIONS["sslmode"] in settings.DATABASES) raised to verify-full'
        in caplog.text
    )
    conn.close()


def test_wrong_name_is_refused_through_django(connections: Any) -> None:
    from django.db.utils import OperationalError

    with pytest.raises(OperationalError) as info:
        connections["wrong_name"].ensure_connection()
    assert isinstance(info.value.__cause__, safepg.HostnameMismatchError)


def test_rogue_ca_is_refused_through_django(
    connections: Any, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    from django.db.utils import OperationalError

    conn = connections["default"]
    conn.close()
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(OperationalError) as info:
        conn.ensure_connection()
    cause = info.value.__cause__
    assert isinstance(cause, safepg.UntrustedCertificateError)
    assert isinstance(cause, psycopg.OperationalError)
    assert "rogue CA" in str(cause)


def test_dbshell_gets_safepg_environment(server: PostgresServer, connections: Any) -> None:
    from django.db import connections as all_connections

    conn = all_connections["weak"]  # OPTIONS["sslmode"] is "require"
    args, env = conn.client.settings_to_cmd_args_env(conn.settings_dict, [])
    assert env is not None
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGSSLROOTCERT"] == str(server.ca_path)
    assert env["PGGSSENCMODE"] == "disable"
    assert args[0] == "psql"
    assert _psql_conninfo(args)["sslmode"] == "verify-full"


def _psql_conninfo(args: Sequence[str]) -> dict[str, Any]:
    """The conninfo safepg put on psql's command line (its first argument)."""
    from psycopg.conninfo import conninfo_to_dict

    assert args[1].startswith("--dbname=")
    return conninfo_to_dict(args[1].removeprefix("--dbname="))


def _psql() -> str:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    if not found:
        pytest.skip("no psql installed")
    return str(found[-1])


def _run_psql(args: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_psql(), *args[1:]],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SSL_OF_SESSION = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.fixture
def hostile_service(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path, monkeypatch: Any
) -> Path:
    """A service file (PGSERVICEFILE) whose service "app" asks for plaintext and the rogue CA."""
    rogue = rogue_ca.write_cert(tmp_path / "rogue-ca's root.crt")
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[app]\nsslmode=disable\nsslrootcert={rogue}\ngssencmode=prefer\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    return rogue


def test_dbshell_conninfo_beats_a_hostile_service_file(
    server: PostgresServer, connections: Any, hostile_service: Path, tmp_path: Path
) -> None:
    from safepg.django.base import DatabaseClient

    # A path libpq must read quoted: a space, a quote and a backslash.
    root = tmp_path / "it's a \\ root.crt"
    root.write_bytes(server.ca_path.read_bytes())
    settings = _database(server, service="app", sslrootcert=str(root))
    # The conninfo wins over -h and -p in the parameters too (-d is refused).
    earlier = ["-h", "wrong.invalid", "-p", "1"]
    args, env = DatabaseClient.settings_to_cmd_args_env(
        settings, [*earlier, "-tA", "-c", SSL_OF_SESSION]
    )
    conninfo = _psql_conninfo(args)
    assert conninfo["sslmode"] == "verify-full"
    assert conninfo["sslrootcert"] == str(root)
    assert conninfo["gssencmode"] == "disable"
    assert conninfo["ssl_min_protocol_version"] == "TLSv1.2"
    assert conninfo["service"] == "app"  # the service's other settings still apply
    assert conninfo["host"] == server.host
    assert "password" not in conninfo
    assert not any(server.password in a for a in args)  # other users can read argv
    assert env is not None
    assert env["PGPASSWORD"] == server.password
    # psql itself, with the service file in reach: a verified TLS session.
    ran = _run_psql(args, env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "t"


def test_dbshell_psql_with_a_rogue_certificate_fails(
    server: PostgresServer,
    connections: Any,
    hostile_service: Path,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
) -> None:
    from safepg.django.base import DatabaseClient

    settings = _database(server, service="app")
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-tA", "-c", SSL_OF_SESSION])
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    ran = _run_psql(args, env)
    assert ran.returncode != 0
    assert "certificate verify failed" in ran.stderr
    assert ran.stdout.strip() == ""


def test_dbshell_refuses_a_plaintext_only_server(
    server: PostgresServer, connections: Any, hostile_service: Path
) -> None:
    from safepg.django.base import DatabaseClient

    from .adversaries import SSL_REQUEST, read_rest, running

    def plaintext_only(conn: Any, adversary: Any) -> None:
        first = conn.recv(8)
        if first == SSL_REQUEST:
            conn.sendall(b"N")  # no TLS here
        else:
            adversary.leak(first)  # a plaintext startup packet
        read_rest(conn, adversary)

    with running(plaintext_only) as adversary:
        settings = {**_database(server, service="app"), "PORT": str(adversary.port)}
        args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-c", "select 1"])
        ran = _run_psql(args, env)
        assert ran.returncode != 0
        assert adversary.received == []  # no startup packet, no password


def test_dbshell_calls_a_password_callable(server: PostgresServer, connections: Any) -> None:
    from safepg.django.base import DatabaseClient

    TOKEN_CALLS.clear()
    settings = _token_database(server)
    args, env = DatabaseClient.settings_to_cmd_args_env(settings, ["-tA", "-c", SSL_OF_SESSION])
    assert env is not None
    assert env["PGPASSWORD"] == server.password
    assert len(TOKEN_CALLS) == 1
    called = TOKEN_CALLS[0]
    assert isinstance(called, safepg.ConnectTarget)
    assert (called.host, called.port, called.user) == (server.host, server.port, server.user)
    assert not any(server.password in a for a in args)
    ran = _run_psql(args, env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "t"


def test_dbshell_refuses_a_password_callable_for_a_socket(
    server: PostgresServer, connections: Any
) -> None:
    from safepg.django.base import DatabaseClient

    TOKEN_CALLS.clear()
    settings = _token_database(
        server, host=str(server.socket_dir), allow_unencrypted_unix_socket=True
    )
    with pytest.raises(safepg.ConfigurationError, match="Unix-domain socket"):
        DatabaseClient.settings_to_cmd_args_env(settings, [])
    assert TOKEN_CALLS == []


def test_dbshell_refuses_double_dash(server: PostgresServer, connections: Any) -> None:
    from safepg.django.base import DatabaseClient

    with pytest.raises(safepg.ConfigurationError, match="'--'"):
        DatabaseClient.settings_to_cmd_args_env(_database(server), ["--", "other"])


_PSYCOPG2_RUN = """
import sys

import safepg
safepg.connect  # safepg needs psycopg 3 itself: loaded (on first use) before it is hidden

sys.modules["psycopg"] = None  # Django falls back to psycopg2, as where psycopg 3 is missing
import django
from django.core.management import call_command
from django.db import connection

django.setup()
from notes.models import Note

call_command("migrate", verbosity=0)
Note.objects.create(text="via psycopg2")
import psycopg2.extensions

assert connection.Database.__name__ == "psycopg2", connection.Database
assert isinstance(connection.connection, psycopg2.extensions.connection)
params = connection.connection.get_dsn_parameters()
print(params["sslmode"], params["gssencmode"], Note.objects.filter(text="via psycopg2").exists())
"""


def test_psycopg2_through_django(server: PostgresServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLE), *sys.path]),
        "DJANGO_SETTINGS_MODULE": "demo_site.settings",
        "DJANGO_DATABASE": server.url() + "&sslmode=require",
    }
    script = tmp_path / "run_psycopg2.py"
    script.write_text(textwrap.dedent(_PSYCOPG2_RUN))
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["verify-full", "disable", "True"]


def test_example_project(server: PostgresServer) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py")],
        env={**os.environ, "DJANGO_DATABASE": server.url()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "written through safepg" in proc.stdout
    assert "verified TLSv1." in proc.stdout


@pytest.mark.parametrize("last", ["-c", "-U", "-Xc", "--host", "-o", "--out"])
def test_dbshell_refuses_a_last_option_without_its_value(
    server: PostgresServer, connections: Any, last: str
) -> None:
    # psql would take safepg's --dbname=... as that option's value, and connect from the
    # environment (a socket, PGHOST, a service file) instead.
    from safepg.django.base import DatabaseClient

    with pytest.raises(safepg.ConfigurationError, match="takes a value and has none"):
        DatabaseClient.settings_to_cmd_args_env(_database(server), ["-X", last])


@pytest.mark.parametrize(
    "parameters", [["-c", "select 1"], ["-cselect 1"], ["-X"], ["--command=select 1"], ["-q"]]
)
def test_dbshell_takes_options_with_their_values(
    server: PostgresServer, connections: Any, parameters: list[str]
) -> None:
    from safepg.django.base import DatabaseClient

    args, _ = DatabaseClient.settings_to_cmd_args_env(_database(server), parameters)
    assert args[1].startswith("--dbname=")


@pytest.mark.parametrize(
    "parameters",
    [["-d", "sslmode=disable"], ["-dx"], ["-Xd", "x"], ["--dbname=x"], ["--db", "x"], ["--d=x"]],
)
def test_dbshell_refuses_parameters_that_name_the_database(
    server: PostgresServer, connections: Any, parameters: list[str]
) -> None:
    from safepg.django.base import DatabaseClient

    with pytest.raises(safepg.ConfigurationError, match="must not name the database"):
        DatabaseClient.settings_to_cmd_args_env(_database(server), parameters)


def test_dbshell_conninfo_holds_with_posixly_correct(
    server: PostgresServer, connections: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # glibc's getopt then stops at the first positional argument: a conninfo after one would be
    # read as psql's user name, and psql would connect from PGHOST instead.
    from safepg.django.base import DatabaseClient

    args, env = DatabaseClient.settings_to_cmd_args_env(
        _database(server), ["-tA", "-c", SSL_OF_SESSION, "positional"]
    )
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    monkeypatch.setenv("PGHOST", "127.0.0.7")
    ran = _run_psql(args, env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "t"
