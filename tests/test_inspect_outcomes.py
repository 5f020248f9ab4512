"""``safepg inspect`` tells a refused port from an unreachable one, from a port that accepted
the connection and then said nothing, and from one where something other than PostgreSQL
answers; connecting to the latter says so too."""

from __future__ import annotations

import pytest

import safepg
from safepg._cli import main

from . import adversaries
from .cli_json import run_json

HINT = "Is this a PostgreSQL port?"


def test_no_answer_after_connecting(stalled_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "inspect", f"127.0.0.1:{stalled_port}", "--timeout", "1")
    assert code == 1
    assert (data["reachable"], data["connection"]) == (True, "silent")
    (problem,) = data["problems"]
    assert problem.startswith(f"127.0.0.1:{stalled_port} accepted the TCP connection, then gave")
    assert HINT in problem
    assert "cannot reach" not in problem


def test_no_answer_after_connecting_in_words(
    stalled_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", f"127.0.0.1:{stalled_port}", "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert "no answer after connecting" in out
    assert "unreachable" not in out


@pytest.mark.parametrize(
    ("behaviour", "connection", "words"),
    [
        (adversaries.http_server, "not-postgresql", "answered PostgreSQL's TLS request with 'H'"),
        (adversaries.hang_up, "closed", "then closed it without answering"),
    ],
)
def test_not_postgresql(
    capsys: pytest.CaptureFixture[str], behaviour: object, connection: str, words: str
) -> None:
    with adversaries.running(behaviour) as adversary:  # type: ignore[arg-type]
        code, data = run_json(capsys, "inspect", f"127.0.0.1:{adversary.port}", "--timeout", "5")
    assert code == 1
    assert (data["reachable"], data["tls"], data["connection"]) == (True, False, connection)
    (problem,) = data["problems"]
    assert words in problem
    assert HINT in problem
    assert data["advice"] == []  # not "turn TLS on in postgresql.conf"


def test_connecting_to_a_web_server_asks_about_the_port() -> None:
    with adversaries.running(adversaries.http_server) as adversary:
        with pytest.raises(safepg.ProtocolViolationError) as info:
            safepg.connect(
                host="127.0.0.1", port=adversary.port, user="u", dbname="d", sslrootcert="system"
            )
        assert adversary.received == []  # nothing after the SSLRequest
    assert HINT in str(info.value)
