"""``manage.py dbshell`` with ``ENGINE: "safepg.django"``, case by case as Django's own
tests/dbshell/test_postgresql.py checks its PostgreSQL client: the argument list and the
environment that ``settings_to_cmd_args_env`` builds from a settings dict. Django's suite does
not reach safepg's client (its tests import the stock ``DatabaseClient``), so these are the same
cases with what safepg builds instead: one ``--dbname`` conninfo with verify-full and the TLS
settings, everything else Django passes as ``-U``/``-h``/``-p`` or ``PG*`` variables in that
conninfo, and the password in ``PGPASSWORD`` only. The last tests take the psycopg2 path (Django
without psycopg 3), where the driver and dbshell must be safepg's all the same.

No server is needed: settings_to_cmd_args_env only plans the connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from safepg.testing import CertificateAuthority

pytest.importorskip("django")

from safepg.django.base import DatabaseClient  # after the importorskip

# What safepg adds to every conninfo and environment: libpq reads these, and the conninfo wins.
TLS = {"sslmode": "verify-full", "gssencmode": "disable", "ssl_min_protocol_version": "TLSv1.2"}


@pytest.fixture
def root(rogue_ca: CertificateAuthority, tmp_path: Path) -> str:
    """A CA file for OPTIONS["sslrootcert"] (any CA: nothing connects)."""
    return str(rogue_ca.write_cert(tmp_path / "root.crt"))


def settings_to_cmd_args_env(
    settings_dict: dict[str, Any], parameters: list[str] | None = None
) -> tuple[str, dict[str, Any], list[str], dict[str, str] | None]:
    """As Django's test helper, with the conninfo parsed: (program, conninfo, the rest, env)."""
    settings_dict.setdefault("OPTIONS", {})
    args, env = DatabaseClient.settings_to_cmd_args_env(settings_dict, parameters or [])
    program, dbname, *rest = args
    assert dbname.startswith("--dbname=")
    password = settings_dict.get("PASSWORD")
    if password:
        assert not any(password in arg for arg in args)  # other users can read argv
    return program, conninfo_to_dict(dbname.removeprefix("--dbname=")), rest, env


def tls_env(root: str, **more: str) -> dict[str, str]:
    return {
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": root,
        "PGGSSENCMODE": "disable",
        "PGSSLMINPROTOCOLVERSION": "TLSv1.2",
        **more,
    }


def test_basic(root: str) -> None:
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": "someuser",
            "PASSWORD": "somepassword",
            "HOST": "somehost",
            "PORT": "444",
            "OPTIONS": {"sslrootcert": root},
        }
    ) == (
        "psql",
        {"host": "somehost", "port": "444", "user": "someuser", "dbname": "dbname",
         "sslrootcert": root, **TLS},
        [],
        tls_env(root, PGPASSWORD="somepassword"),
    )  # fmt: skip


def test_nopass(root: str) -> None:
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": "someuser",
            "HOST": "somehost",
            "PORT": "444",
            "OPTIONS": {"sslrootcert": root},
        }
    ) == (
        "psql",
        {"host": "somehost", "port": "444", "user": "someuser", "dbname": "dbname",
         "sslrootcert": root, **TLS},
        [],
        tls_env(root),
    )  # fmt: skip


def test_ssl_certificate(root: str) -> None:
    # Django's client passes these as PGSSL* variables, with sslmode as given; safepg's puts them
    # in the conninfo, with sslmode raised to verify-full.
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": "someuser",
            "HOST": "somehost",
            "PORT": "444",
            "OPTIONS": {
                "sslmode": "verify-ca",
                "sslrootcert": root,
                "sslcert": "client.crt",
                "sslkey": "client.key",
            },
        }
    ) == (
        "psql",
        {"host": "somehost", "port": "444", "user": "someuser", "dbname": "dbname",
         "sslrootcert": root, "sslcert": "client.crt", "sslkey": "client.key", **TLS},
        [],
        tls_env(root),
    )  # fmt: skip


@pytest.fixture
def service_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    services = tmp_path / "pg_service.conf"
    services.write_text("[django_test]\nhost=somehost\ndbname=dbname\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    return services


def test_service(root: str, service_file: Path) -> None:
    # Django's gives ["psql"], {"PGSERVICE": "django_test"}: here the service is in the conninfo,
    # which names no database of its own, so that the service's applies; the host safepg checked
    # (the service's, with libpq's default port) is pinned there too.
    settings_dict = {"OPTIONS": {"service": "django_test", "sslrootcert": root}}
    assert settings_to_cmd_args_env(settings_dict) == (
        "psql",
        {"service": "django_test", "host": "somehost", "port": "5432", "sslrootcert": root, **TLS},
        [],
        tls_env(root),
    )


def test_passfile(root: str, service_file: Path) -> None:
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": "someuser",
            "HOST": "somehost",
            "PORT": "444",
            "OPTIONS": {"passfile": "~/.custompgpass", "sslrootcert": root},
        }
    ) == (
        "psql",
        {"host": "somehost", "port": "444", "user": "someuser", "dbname": "dbname",
         "passfile": "~/.custompgpass", "sslrootcert": root, **TLS},
        [],
        tls_env(root),
    )  # fmt: skip
    assert settings_to_cmd_args_env(
        {
            "OPTIONS": {
                "service": "django_test",
                "passfile": "~/.custompgpass",
                "sslrootcert": root,
            },
        }
    ) == (
        "psql",
        {"service": "django_test", "passfile": "~/.custompgpass", "host": "somehost",
         "port": "5432", "sslrootcert": root, **TLS},
        [],
        tls_env(root),
    )  # fmt: skip


def test_column(root: str) -> None:
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": "some:user",
            "PASSWORD": "some:password",
            "HOST": "::1",
            "PORT": "444",
            "OPTIONS": {"sslrootcert": root},
        }
    ) == (
        "psql",
        {"host": "::1", "port": "444", "user": "some:user", "dbname": "dbname",
         "sslrootcert": root, **TLS},
        [],
        tls_env(root, PGPASSWORD="some:password"),
    )  # fmt: skip


def test_accent(root: str) -> None:
    username = "rôle"
    password = "sésame"
    assert settings_to_cmd_args_env(
        {
            "NAME": "dbname",
            "USER": username,
            "PASSWORD": password,
            "HOST": "somehost",
            "PORT": "444",
            "OPTIONS": {"sslrootcert": root},
        }
    ) == (
        "psql",
        {"host": "somehost", "port": "444", "user": username, "dbname": "dbname",
         "sslrootcert": root, **TLS},
        [],
        tls_env(root, PGPASSWORD=password),
    )  # fmt: skip


def test_parameters(root: str) -> None:
    # Django's: ["psql", "--help", "dbname"]. safepg's conninfo goes first (see POSIXLY_CORRECT
    # in test_django.py), the parameters after it, in their order.
    assert settings_to_cmd_args_env(
        {"NAME": "dbname", "HOST": "somehost", "OPTIONS": {"sslrootcert": root}}, ["--help", "-X"]
    ) == (
        "psql",
        {"host": "somehost", "port": "5432", "dbname": "dbname", "sslrootcert": root, **TLS},
        ["--help", "-X"],
        tls_env(root),
    )


def test_no_host_is_refused(root: str) -> None:
    # Django's tests leave HOST out (psql then uses its Unix-domain socket, never with TLS):
    # safepg refuses that, unless OPTIONS allow an unencrypted socket.
    import safepg

    with pytest.raises(safepg.ConfigurationError, match="Unix-domain socket"):
        settings_to_cmd_args_env({"NAME": "dbname", "OPTIONS": {"sslrootcert": root}})


def test_default_database_name(root: str) -> None:
    # As Django's client: with neither NAME nor a service, the database "postgres".
    dict_ = {"HOST": "somehost", "OPTIONS": {"sslrootcert": root}}
    assert settings_to_cmd_args_env(dict_)[1]["dbname"] == "postgres"


def test_default_trust_anchors_in_conninfo_and_environment() -> None:
    _, conninfo, _, env = settings_to_cmd_args_env({"NAME": "dbname", "HOST": "somehost"})
    assert env is not None
    assert conninfo["sslrootcert"] == env["PGSSLROOTCERT"]
    assert Path(conninfo["sslrootcert"]).is_file()


def test_crash_password_does_not_leak(root: str, tmp_path: Path) -> None:
    # Django's test: the password is not in the exception of a client that crashes.
    args, env = DatabaseClient.settings_to_cmd_args_env(
        {"PASSWORD": "somepassword", "HOST": "somehost", "OPTIONS": {"sslrootcert": root}}, []
    )
    fake_client = tmp_path / "fake_client.py"
    fake_client.write_text("import sys\nsys.exit(1)\n")
    args[0:1] = [sys.executable, str(fake_client)]
    with pytest.raises(subprocess.CalledProcessError) as ctx:
        subprocess.run(args, check=True, env={**os.environ, **(env or {})})
    assert "somepassword" not in str(ctx.value)
    assert "somepassword" not in repr(ctx.value.cmd)


# -- the psycopg2 path: Django without psycopg 3 --------------------------------------------

_PSYCOPG2_PATH = """
import inspect
import json
import sys

import safepg  # safepg needs psycopg 3 itself: loaded before it is hidden
import safepg.psycopg2

sys.modules["psycopg"] = None  # Django falls back to psycopg2, as where psycopg 3 is missing
from django.conf import settings

settings.configure()
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from safepg.django.base import DatabaseClient, DatabaseWrapper

settings_dict = json.loads(sys.argv[1])
wrapper = DatabaseWrapper({**settings_dict, "ENGINE": "safepg.django"}, "default")
wrapper.settings_dict.setdefault("CONN_HEALTH_CHECKS", False)
print(json.dumps({
    "is_psycopg3": is_psycopg3,
    "driver": wrapper.Database.__name__,
    "connect": inspect.unwrap(wrapper.Database.connect) is safepg.psycopg2.connect,
    "client": wrapper.client_class is DatabaseClient,
    "dbshell": DatabaseClient.settings_to_cmd_args_env(settings_dict, ["-X"]),
}))
"""


def test_psycopg2_path_uses_safepgs_driver_and_dbshell(root: str, tmp_path: Path) -> None:
    settings_dict = {
        "NAME": "dbname",
        "USER": "someuser",
        "PASSWORD": "somepassword",
        "HOST": "somehost",
        "PORT": "444",
        "OPTIONS": {"sslrootcert": root, "sslmode": "require"},
        "TIME_ZONE": None,
        "CONN_MAX_AGE": 0,
        "AUTOCOMMIT": True,
        "ATOMIC_REQUESTS": False,
        "TEST": {},
    }
    script = tmp_path / "psycopg2_path.py"
    script.write_text(textwrap.dedent(_PSYCOPG2_PATH))
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(settings_dict)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    expected_args, expected_env = DatabaseClient.settings_to_cmd_args_env(settings_dict, ["-X"])
    assert seen == {
        "is_psycopg3": False,
        "driver": "psycopg2",
        "connect": True,
        "client": True,
        "dbshell": [expected_args, expected_env],  # the same as with psycopg 3
    }
    assert conninfo_to_dict(expected_args[1].removeprefix("--dbname="))["sslmode"] == "verify-full"
