"""Attack round 3b: holes found in named typos, origins, ``check -W``, inspect and SQLAlchemy."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo

import safepg
from safepg import ConfigurationError
from safepg._inspect import inspect_server
from safepg._trust import TrustSource
from safepg._typos import may_hold_secret
from safepg.testing import CertificateAuthority, PostgresServer


@pytest.mark.parametrize(
    "text",
    [
        # libpq 18's oauth_client_secret: a badly quoted secret's second word became the
        # "unknown option" shown by name.
        "host=localhost oauth_client_secret=hunter2 hunter3=x",
        "postgresql://localhost/db?oauth_client_secret=a&hunter3=1",
        # libpq 18's SCRAM keys (the keys derived from the password) likewise.
        "host=localhost scram_client_key=hunter2 hunter3=x",
        "host=localhost scram_server_key=hunter2 hunter3=x",
    ],
)
def test_a_badly_quoted_client_secret_is_not_named_as_an_unknown_option(text: str) -> None:
    assert may_hold_secret(text)
    with pytest.raises(ConfigurationError) as caught:
        safepg.connect(text)
    assert "hunter" not in str(caught.value)


# A password typed with an unescaped "@" and "?" puts its tail in the URL's query, where
# SQLAlchemy reads "hunter3" as a query option's name.
_SPLIT_PASSWORD_URL = "postgresql://bob:p@ss?hunter3=x@localhost/db"


def test_a_sqlalchemy_query_key_that_may_be_part_of_a_password_is_not_named() -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError) as caught:
        safepg.sqlalchemy.creator(_SPLIT_PASSWORD_URL)()
    assert "hunter" not in str(caught.value)
    assert "unknown option" in str(caught.value)


def test_a_sqlalchemy_query_typo_is_still_named_without_a_password() -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError, match='"hunter3": libpq has no such keyword'):
        safepg.sqlalchemy.creator("postgresql://localhost/db?hunter3=x")()


def test_an_asyncpg_url_query_key_that_may_be_part_of_a_password_is_not_named() -> None:
    pytest.importorskip("asyncpg")
    import safepg.sqlalchemy

    url = _SPLIT_PASSWORD_URL.replace("postgresql:", "postgresql+asyncpg:")
    with pytest.raises(ConfigurationError) as caught:
        safepg.sqlalchemy.asyncpg_creator(url)
    assert "hunter" not in str(caught.value)
    assert "query option" in str(caught.value)


def _check_w(
    target: str, stdin: Any, *extra: str, data: bytes | None = None, closed: bool = False
) -> Any:
    """``safepg check -W --json`` in a child without a controlling terminal (as in CI)."""
    env = {**os.environ, "PYTHONPATH": str(Path(safepg.__file__).parent.parent), "CI": "true"}
    command = [sys.executable, "-m", "safepg", "check", "-W", "--json", *extra, target]
    if closed:  # started with descriptor 0 closed
        command = ["sh", "-c", 'exec "$@" <&-', "sh", *command]
    return subprocess.run(
        command,
        stdin=stdin,
        input=data,
        capture_output=True,
        env=env,
        start_new_session=True,  # no /dev/tty
        timeout=60,
    )


def _without_password(server: PostgresServer) -> str:
    return make_conninfo(
        "",
        host=server.host,
        port=server.port,
        user=server.user,
        dbname=server.dbname,
        sslrootcert=str(server.ca_path),
    )


@pytest.mark.parametrize("stdin", ["devnull", "closed"])
def test_check_w_without_a_terminal_or_input_is_a_usage_error_in_json(
    server: PostgresServer, stdin: str
) -> None:
    # It was a traceback (EOFError; AttributeError with stdin closed), not the JSON document.
    if stdin == "devnull":
        proc = _check_w(_without_password(server), subprocess.DEVNULL)
    else:
        proc = _check_w(_without_password(server), None, closed=True)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 2, proc.stderr
    assert doc["error"]["class"] == "ConfigurationError"
    assert "PGPASSWORD" in doc["error"]["message"]
    assert b"Traceback" not in proc.stderr


def test_check_w_does_not_wait_past_its_timeout_on_a_silent_input(server: PostgresServer) -> None:
    started = time.monotonic()
    with subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE) as silent:
        try:
            proc = _check_w(_without_password(server), silent.stdout, "--timeout", "2")
        finally:
            silent.kill()
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, proc.stderr
    assert "no line came on standard input" in json.loads(proc.stdout)["error"]["message"]


def test_check_w_reads_a_piped_password_and_never_shows_it(server: PostgresServer) -> None:
    proc = _check_w(_without_password(server), None, data=server.password.encode() + b"\n")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, doc["error"]
    assert doc["client"]["verified"] is True
    assert server.password.encode() not in proc.stdout + proc.stderr
    wrong = _check_w(_without_password(server), None, data=b"wrong-hunter2\n")
    assert wrong.returncode == 1
    assert b"hunter2" not in wrong.stdout + wrong.stderr


def test_inspect_keeps_one_deadline_for_all_its_probes(tmp_path: Path) -> None:
    """A server that answers the first probe with a chain the trust anchors do not verify,
    then leaves every later connection silent, held inspect for the timeout once per other
    trust source tried (1 + 7 times it)."""
    ca = CertificateAuthority()
    cert, key = ca.issue("localhost").write(tmp_path / "c.pem", tmp_path / "k.pem")
    other = CertificateAuthority("another CA").write_cert(tmp_path / "other.pem")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        first = True
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(8)  # the SSLRequest
            conn.sendall(b"S")
            if first:
                first = False
                with contextlib.suppress(OSError):  # the client gives up on the unknown CA
                    ctx.wrap_socket(conn, server_side=True).recv(1)

    threading.Thread(target=serve, daemon=True).start()
    timeout = 1.5
    started = time.monotonic()
    try:
        found = inspect_server(
            "localhost",
            listener.getsockname()[1],
            trust=TrustSource(str(other), "another CA", "sslrootcert"),
            hostaddr="127.0.0.1",
            timeout=timeout,
        )
    finally:
        listener.close()
        for conn in held:
            conn.close()
    elapsed = time.monotonic() - started
    assert found.trust_verifies is False
    assert elapsed < 2.5 * timeout, elapsed


def test_the_engine_pool_refuses_a_connection_that_writes_its_tls_secrets(
    server: PostgresServer, tmp_path: Path
) -> None:
    """A creator's own psycopg connection, verify-full but with sslkeylogfile: the option
    policy refuses it on every safepg path, and the pool let it in."""
    import psycopg
    import sqlalchemy

    import safepg.sqlalchemy  # registers postgresql+safepg

    if "sslkeylogfile" not in {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()}:
        pytest.skip("libpq before 18 has no sslkeylogfile")
    keylog = tmp_path / "keys.log"

    def creator() -> Any:
        return psycopg.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            dbname=server.dbname,
            sslmode="verify-full",
            sslrootcert=str(server.ca_path),
            sslkeylogfile=str(keylog),
        )

    engine = sqlalchemy.create_engine("postgresql+safepg://", creator=creator)
    try:
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
            engine.connect()
    finally:
        engine.dispose()
    assert isinstance(caught.value.orig, safepg.InsecureConnectionError)
    assert "sslkeylogfile" in str(caught.value)
    assert str(keylog) not in str(caught.value)
