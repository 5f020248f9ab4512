"""One JSON contract for every command: ``schema``, ``ok``, ``exit_code`` and ``error`` in every
document, one type per field everywhere, and failure documents that keep every key (what is
known filled in, null or empty for the rest). Each document, success and failure, is validated
against the JSON Schema shipped for its ``schema`` (see ``cli_json``)."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from safepg import _cli, providers
from safepg._cli import main
from safepg._cli._output import schema_file
from safepg.testing import CertificateAuthority, PostgresServer

from .cli_json import run_json, schema, validate
from .conftest import CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
SCHEMA_NAMES = sorted(
    [*(m.SCHEMA for m in _cli.COMMANDS if hasattr(m, "SCHEMA")), _cli.USAGE_SCHEMA]
)
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


# -- the schema files --------------------------------------------------------------------------


def test_every_command_with_json_has_a_shipped_schema() -> None:
    assert SCHEMA_NAMES == [
        "safepg.bundles/1", "safepg.ca/1", "safepg.check/1", "safepg.env/1",
        "safepg.inspect/1", "safepg.providers/1", "safepg.usage/1",
    ]  # fmt: skip
    shipped = sorted(p.name for p in (importlib.resources.files("safepg") / "schemas").iterdir())
    assert shipped == sorted(schema_file(name).name for name in SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_files_are_valid_and_agree(name: str) -> None:
    found = schema(name)
    jsonschema.Draft202012Validator.check_schema(found)
    assert found["title"] == name
    assert found["properties"]["schema"] == {"const": name}
    assert found["required"][:4] == ["schema", "ok", "exit_code", "error"]
    assert set(found["required"]) == set(found["properties"])
    # The shared definitions are the same in every file (each file stands alone).
    assert found["$defs"] == schema("safepg.check/1")["$defs"]


def test_a_document_that_breaks_the_contract_fails_validation() -> None:
    good = {
        "schema": "safepg.ca/1", "ok": True, "exit_code": 0, "error": None, "host": None,
        "port": None, "path": "/x.pem", "label": "x", "origin": "certifi", "provider": None,
        "output": None,
    }  # fmt: skip
    validate(good)
    bad: list[dict[str, Any]] = [
        {**good, "port": "5432"},  # a port as a string
        {**good, "exit_code": 2},  # ok with a failure code
        {**good, "ok": False},  # a failure with the success code
        {**good, "extra": 1},  # a key the schema does not describe
        {k: v for k, v in good.items() if k != "host"},  # a key missing
    ]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            validate(doc)


# -- check ---------------------------------------------------------------------------------------


def test_check_success(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "check", server.url())
    assert code == 0
    assert data["port"] == server.port  # an integer, as in inspect
    assert data["host"] == "127.0.0.1"
    assert ISO_UTC.match(data["server"]["backend_start"])  # ISO 8601, "T", UTC
    for cert in data["certificates"]:
        assert ISO_UTC.match(cert["not_after"])
        assert ISO_UTC.match(cert["not_before"])


@pytest.mark.parametrize(
    ("case", "code", "error"),
    [
        ("wrong-name", 3, "HostnameMismatchError"),
        ("expired", 3, "CertificateExpiredError"),
        ("untrusted", 3, "UntrustedCertificateError"),
        ("ssl-off", 3, "SSLNotSupportedError"),
        ("closed-port", 1, "OperationalError"),
        ("bad-password", 1, "OperationalError"),
        ("missing-ca-file", 2, "ConfigurationError"),
        ("socket", 2, "ConfigurationError"),
        ("garbage", 2, "ConfigurationError"),
    ],
)
def test_check_failure_keeps_what_is_known(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    closed_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: int,
    error: str,
) -> None:
    target = {
        "wrong-name": server.conninfo(host="db.example.com", hostaddr="127.0.0.1"),
        "closed-port": server.conninfo(port=closed_port),
        "bad-password": server.conninfo(password="wrong"),
        "missing-ca-file": server.conninfo(sslrootcert=str(tmp_path / "missing.pem")),
        "socket": server.conninfo(host=str(server.socket_dir)),
        "garbage": "host='unterminated",
    }.get(case, server.conninfo())
    if case == "untrusted":
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    elif case == "expired":
        certs.present("localhost", ip_addresses=["127.0.0.1"], not_after=NOW - dt.timedelta(days=2))
    if case == "ssl-off":
        with server.ssl_disabled():
            got, data = run_json(capsys, "check", target)
    else:
        got, data = run_json(capsys, "check", target)
    assert (got, data["error"]["class"]) == (code, error)
    assert data["ok"] is False
    # Monitoring code can read every key of a failure document.
    assert data["client"]["verified"] is False
    assert data["server"]["pid"] is None
    assert data["certificates"] == []
    if code == 2:  # the input was refused: where it would go is not known
        assert data["host"] is None
        assert data["port"] is None
    else:
        assert data["host"] == ("db.example.com" if case == "wrong-name" else "127.0.0.1")
        assert data["port"] == (closed_port if case == "closed-port" else server.port)
        assert data["trust"]["path"] == str(server.ca_path)
        assert data["trust"]["origin"] == "sslrootcert"
    assert server.password not in json.dumps(data)


# -- inspect -------------------------------------------------------------------------------------


def inspect_args(server: PostgresServer, *extra: str) -> list[str]:
    return [
        "inspect", f"localhost:{server.port}", "--hostaddr", "127.0.0.1",
        "--sslrootcert", str(server.ca_path), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("good", 0),
        ("expiring", 4),
        ("untrusted", 3),
        ("ssl-off", 3),
        ("closed-port", 1),
        ("missing-ca-file", 2),
        ("stalled", 1),
    ],
)
def test_inspect_documents(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    closed_port: int,
    stalled_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: int,
) -> None:
    args = inspect_args(server, "--timeout", "2")
    if case == "expiring":
        certs.present("localhost", ip_addresses=["127.0.0.1"], not_after=NOW + dt.timedelta(days=9))
    elif case == "untrusted":
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    elif case == "closed-port":
        args[1] = f"localhost:{closed_port}"
    elif case == "stalled":
        args[1] = f"localhost:{stalled_port}"
    elif case == "missing-ca-file":
        args[5] = str(tmp_path / "missing.pem")
    if case == "ssl-off":
        with server.ssl_disabled():
            got, data = run_json(capsys, *args)
    else:
        got, data = run_json(capsys, *args)
    assert got == code
    assert isinstance(data["port"], int)
    assert data["host"] == "localhost"
    if case == "missing-ca-file":
        assert data["error"]["class"] == "ConfigurationError"
        assert data["trust"] is None
    else:
        assert data["error"] is None
        assert data["trust"]["origin"] == "sslrootcert"
    if case == "expiring":
        assert data["ok"] is True
        assert data["warnings"]


# -- ca, env, providers, bundles -----------------------------------------------------------------


def test_ca_documents(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "ca")
    assert (code, data["host"], data["provider"]) == (0, None, None)
    code, data = run_json(
        capsys, "ca", "--host", "db.x.eu-west-1.rds.amazonaws.com", "--port", "5433"
    )
    assert (code, data["origin"], data["port"]) == (0, "bundled", 5433)
    assert data["provider"] == {"key": "rds", "name": "Amazon RDS / Aurora", "trust": "bundled"}
    code, data = run_json(capsys, "ca", "--host", "x.db.postgresbridge.com")
    assert (code, data["path"], data["provider"]["trust"]) == (2, None, "not-bundled")
    assert data["host"] == "x.db.postgresbridge.com"
    # A provider whose CA safepg fetches, without its credential: what to set (tests/test_fetch).
    code, data = run_json(capsys, "ca", "--host", "x.b.db.ondigitalocean.com")
    assert (code, data["path"], data["provider"]["trust"]) == (2, None, "fetched")
    assert "DIGITALOCEAN_TOKEN" in data["error"]["message"]


def test_env_documents(server: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "env", server.url())
    assert code == 0
    assert data["env"]["PGSSLROOTCERT"] == str(server.ca_path) == data["trust"]["path"]
    code, data = run_json(capsys, "env", "host=x.db.postgresbridge.com")
    assert (code, data["env"]) == (2, None)
    assert data["trust"]["origin"] in ("os-store", "certifi")  # known, though it would not do
    code, data = run_json(capsys, "env", "host='unterminated")
    assert (code, data["env"], data["trust"]) == (2, None, None)
    assert server.password not in json.dumps(data)


@pytest.fixture
def bundle_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bundles"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("SAFEPG_BUNDLE_DIR", str(directory))
    return directory


def test_providers_documents(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "providers")
    assert code == 0
    assert [p["key"] for p in data["profiles"]] == [p.key for p in providers.PROFILES]
    assert all(ISO_UTC.match(f["earliest_expiry"]) for f in data["bundle_files"])
    assert data["override_dir"] == str(bundle_dir)
    (bundle_dir / "rds-global-bundle.pem").write_bytes(b"not a bundle")
    code, data = run_json(capsys, "providers")
    assert code == 2
    assert "rds-global-bundle.pem" in data["error"]["message"]
    assert data["profiles"]  # still known


def test_bundles_documents(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority("one more root")
    shipped = Path(providers.shipped_path("azure-postgres-roots.pem")).read_bytes()
    newer = tmp_path / "newer.pem"
    newer.write_bytes(shipped + ca.cert_pem)
    code, data = run_json(
        capsys, "bundles", "check", str(newer), "--replace", "azure-postgres-roots.pem"
    )
    assert code == 0
    assert [a["subject"] for a in data["added"]] == ["CN=one more root"]
    assert (data["removed"], data["installed_as"]) == ([], None)
    assert data["added"][0]["known"] is False
    code, data = run_json(
        capsys, "bundles", "install", str(newer), "--replace", "azure-postgres-roots.pem",
        "--allow-new-root", data["added"][0]["sha256"],
    )  # fmt: skip
    assert code == 0
    assert data["installed_as"] == str(bundle_dir / "azure-postgres-roots.pem")
    assert len(data["certificates"]) == 4
    code, data = run_json(capsys, "bundles", "check", str(tmp_path / "missing.pem"))
    assert (code, data["error"]["class"]) == (2, "FileNotFoundError")
    expired = tmp_path / "expired.pem"
    expired.write_bytes(CertificateAuthority("old", not_after=NOW - dt.timedelta(days=1)).cert_pem)
    code, data = run_json(
        capsys, "bundles", "install", str(expired), "--replace", "rds-global-bundle.pem"
    )
    assert (code, data["error"]["class"], data["installed_as"]) == (3, "BundleError", None)
    assert "expired on" in data["error"]["message"]


def test_an_unexpected_driver_error_still_gives_the_document(
    server: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error no command expected (here: the session ends under the check's own query) still
    ends in the command's document, with what was known."""
    from safepg._cli import check

    monkeypatch.setattr(check, "_ACTIVITY_QUERY", "SELECT pg_terminate_backend(pg_backend_pid())")
    code, data = run_json(capsys, "check", server.conninfo())
    assert code == 1
    assert data["error"]["class"] in ("OperationalError", "AdminShutdown")
    assert (data["host"], data["port"]) == ("127.0.0.1", server.port)
    assert data["client"]["verified"] is True  # the session was verified before it ended


@pytest.mark.parametrize(
    "argv",
    [
        ["ca", "--host", "app:S3CRET@db"],
        ["ca", "--host", "app:S3CRET@db", "--port", "5432"],
        ["inspect", "app:S3CRET@db:5432"],
        ["inspect", "app:S3CRET@db"],  # refused by the argument parser
        ["inspect", "db.example.com", "--hostaddr", "S3CRET@x"],
        ["env", "host=app:S3CRET@db"],
        ["check", "postgresql://app:S3CRET@db:x/app"],
        # An unquoted URL whose password has spaces: argparse would echo the words.
        ["check", "postgresql://u:correct", "S3CRET", "battery@db.example.com/app"],
        ["env", "postgresql://u:correct", "S3CRET", "battery@db.example.com/app"],
        ["inspect", "db.example.com:5432", "u:correct", "S3CRET"],
        # No command: argparse quotes the value back as an invalid choice.
        ["host=h password='it\\'s S3CRET'"],
        ["postgres://u:it's S3CRET@h/db"],
        ["bundles", "check", "f", "--replace", "it's S3CRET@x"],
        ["ca", "--port", "S3CRET"],
        ["check", "--timeout", "S3CRET", "host=h"],
    ],
)
def test_a_host_that_holds_a_password_is_never_echoed(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped URL (an unencoded '@' in the password) puts the password in the host: the
    # message says it is withheld, and the document must not show it either.
    for extra in ([], ["--json"]):
        try:
            code = main([*argv, *extra])
        except SystemExit as exit_:  # argparse
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        assert code == 2
        assert "S3CRET" not in out + err
        if extra:
            validate(json.loads(out))


@pytest.mark.parametrize("command", [c.__name__.rpartition(".")[2] for c in _cli.COMMANDS])
def test_a_usage_error_with_json_is_a_json_document(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--no-such-option", "postgresql://app:S3CRET@db/app", "--json"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2
    data = json.loads(out)
    validate(data)
    assert data["schema"] == "safepg.usage/1"
    assert data["error"]["class"] == "UsageError"
    assert data["command"] in (command, None)
    assert "S3CRET" not in out + err
    with pytest.raises(SystemExit):  # without --json: argparse's text, withheld the same way
        main(argv[:-1])
    out, err = capsys.readouterr()
    assert "S3CRET" not in out + err
    assert "error:" in err
