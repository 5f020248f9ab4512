"""What every command shares: exit codes, human output, the JSON document, and escaping.

A command builds one document as it learns things (`Output.start`, then plain dict updates), and
ends with `Output.finish` or `Output.fail`. In ``--json`` mode that document is printed, always
with ``schema``, ``ok``, ``exit_code`` and ``error`` first, and with every key of its schema even
on failure (unknown values stay null); otherwise the command prints lines for people and a
failure goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.resources
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import psycopg

from .._text import shown, shown_lines

if TYPE_CHECKING:
    from importlib.abc import Traversable

    from .._probe import CertificateInfo
    from .._trust import TrustSource

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_CONNECT, EXIT_USAGE, EXIT_INSECURE, EXIT_EXPIRING = 0, 1, 2, 3, 4
DEFAULT_TIMEOUT = 10.0


def schema_file(schema: str) -> Traversable:
    """The JSON Schema shipped for a document's ``schema`` value: ``safepg.check/1`` is
    ``safepg/schemas/check-1.json``."""
    name, _, version = schema.removeprefix("safepg.").partition("/")
    return importlib.resources.files("safepg") / "schemas" / f"{name}-{version}.json"


class Output:
    """One command's output: lines for people (aligned, coloured only on a terminal and never
    with ``NO_COLOR``), or one JSON document."""

    def __init__(self, command: str, json_mode: bool = False, stream: TextIO | None = None):
        self.command = command
        self.json = json_mode
        self.stream = stream or sys.stdout
        self.doc: dict[str, Any] | None = None
        self.colour = (
            self.stream.isatty()
            and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb"
        )

    # -- the document ------------------------------------------------------------------------

    def start(self, schema: str, **fields: Any) -> dict[str, Any]:
        """Begin the document with every key its schema has; returns it, to fill in."""
        self.doc = {"schema": schema, "ok": False, "exit_code": EXIT_CONNECT, "error": None}
        self.doc.update(fields)
        return self.doc

    def finish(self, code: int, *, ok: bool | None = None) -> int:
        """End the command with exit status *code*; ``ok`` is ``code == 0`` unless given."""
        if self.doc is not None:
            self.doc["ok"] = code == EXIT_OK if ok is None else ok
            self.doc["exit_code"] = code
            if self.json:
                # ASCII only: text from the network is kept raw, as JSON escapes.
                print(json.dumps(self.doc, indent=2), file=self.stream)
        return code

    def fail(self, ex: BaseException, message: str | None = None) -> int:
        """End the command with *ex*: its exit status, and its class and message (*message*,
        when given, is that text redacted or worded for the command line)."""
        text = str(ex) if message is None else message
        return self.refuse(exit_code(ex), type(ex).__name__, for_people(ex, text))

    def refuse(self, code: int, kind: str, message: str) -> int:
        """End the command with an error of class *kind*: in the document, or on stderr."""
        if self.doc is not None:
            self.doc["error"] = {"class": kind, "message": message}
        if not self.json:
            separator = "\n" if "\n" in message else " "
            print(f"safepg {self.command}: {kind}:{separator}{message}", file=sys.stderr)
        return self.finish(code, ok=False)

    # -- lines for people --------------------------------------------------------------------

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def good(self, text: str) -> str:
        return self._paint(text, "32")

    def bad(self, text: str) -> str:
        return self._paint(text, "31;1")

    def warn(self, text: str) -> str:
        return self._paint(text, "33")

    def bold(self, text: str) -> str:
        return self._paint(text, "1")

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def field(self, key: str, value: object, indent: int = 2, width: int = 16) -> None:
        print(f"{' ' * indent}{key:<{width}} {value}", file=self.stream)

    def note(self, text: str) -> None:
        """A message on stderr, for people (also in JSON mode, where stdout is the document)."""
        print(f"safepg {self.command}: {text}", file=sys.stderr)


# -- exit codes and error text -----------------------------------------------------------------


def exit_code(ex: BaseException) -> int:
    """2 for bad input (`ConfigurationError`), 3 for a server that could not be verified
    (`ConnectionSecurityError`), 1 for anything else (unreachable, refused, authentication)."""
    from .._errors import ConfigurationError, ConnectionSecurityError

    if isinstance(ex, ConfigurationError):
        return EXIT_USAGE
    if isinstance(ex, ConnectionSecurityError):
        return EXIT_INSECURE
    return EXIT_CONNECT


def for_people(ex: BaseException, message: str) -> str:
    """*message* (from *ex*) ready to print. safepg's own messages show the network's text
    escaped already; psycopg's may quote the server's, so each of their lines is escaped (its
    tabs indent libpq's hints), and every line after the first is marked as continued."""
    from .._errors import SafePGError

    if isinstance(ex, SafePGError):
        return message
    # A line break may be the server's own (it quotes names in its refusals): no line of the
    # driver's text starts where one of safepg's could.
    first, *rest = shown_lines(message).split("\n")
    return "\n".join([first, *(f"  | {line}" for line in rest if line)])


def secrets_of(target: str) -> tuple[str | None, ...]:
    """The password and sslpassword in a conninfo or URL, to redact from messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(target)
    except psycopg.Error:
        return ()
    return (str(params.get("password") or "") or None, str(params.get("sslpassword") or "") or None)


# -- JSON values: one type per field, everywhere ------------------------------------------------


def iso(when: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC, with a ``T``: ``2026-11-28T16:12:42.533992+00:00``."""
    if when is None:
        return None
    if when.tzinfo is None:  # pragma: no cover - safepg's and psycopg's times are aware
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat()


def port_number(value: object) -> int | None:
    """A port as an integer (libpq and safepg's errors hold it as text), or None."""
    if isinstance(value, int):
        return value
    text = str(value or "")
    return int(text) if text.isdigit() else None


def trust_json(trust: TrustSource | None) -> dict[str, Any] | None:
    if trust is None:
        return None
    return {"path": trust.path, "label": trust.label, "origin": trust.origin}


def cert_json(cert: CertificateInfo) -> dict[str, Any]:
    from .._inspect import days_left

    return {
        "subject": cert.subject,
        "issuer": cert.issuer,
        "names": list(cert.names),
        "not_before": iso(cert.not_before),
        "not_after": iso(cert.not_after),
        "days_left": days_left(cert),
    }


# -- shared pieces of human output --------------------------------------------------------------


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def print_chain(out: Output, chain: Sequence[CertificateInfo]) -> None:
    from .._inspect import EXPIRY_WARNING_DAYS, days_left

    # Every name is the server's text: shown escaped (the callers' headings say it is unverified).
    for i, cert in enumerate(chain):
        role = "server" if i == 0 else "CA"
        out.line(f"  [{i}] {role}: {shown(cert.subject) or '(empty subject)'}")
        out.field("issuer", shown(cert.issuer), 6)
        if cert.names:
            out.field("names", ", ".join(map(shown, cert.names)), 6)
        left = days_left(cert)
        if cert.not_after is not None and left is not None:
            text = f"{cert.not_after:%Y-%m-%d} ({plural(left, 'day')})"
            if left < 0:
                text = out.bad(f"{cert.not_after:%Y-%m-%d} (EXPIRED {plural(-left, 'day')} ago)")
            elif left < EXPIRY_WARNING_DAYS:
                text = out.warn(text + ", renew soon")
            out.field("expires", text, 6)


def invocation() -> str:
    """How this command line was started, for lines people can paste: ``safepg``, a path to
    it, or ``python -m safepg``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if not argv0 or argv0.endswith(("__main__.py", "-c")) or argv0 == "-m":
        return f"{shlex.quote(sys.executable)} -m safepg"
    return shlex.quote(argv0) if os.sep in argv0 else "safepg"


# -- arguments ----------------------------------------------------------------------------------


def timeout_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "not a number of seconds (the value is not shown)"
        ) from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("the timeout must be between 0 and 3600 seconds")
    return seconds


def port_arg(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 0 < int(value) < 65536):
        raise argparse.ArgumentTypeError("not a port number, 1 to 65535 (the value is not shown)")
    return int(value)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document (README)")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    # Also after the command (safepg check URL -v); SUPPRESS keeps the global one otherwise.
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log safepg's decisions on stderr",
    )


def add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the network (default {DEFAULT_TIMEOUT:g})",
    )


# -- -v: safepg's log on stderr -----------------------------------------------------------------


class _LogFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # safepg's messages are already escaped where they quote the network.
        message = record.getMessage().removeprefix("safepg: ")
        return f"safepg: {record.levelname.lower()}: {message}"


def log_to_stderr(verbose: bool) -> Callable[[], None]:
    """Show safepg's log on stderr: warnings, and with *verbose* every decision (DEBUG).
    Returns a function that undoes it, for callers of `main` in-process."""
    logger = logging.getLogger("safepg")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat())
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    level = logger.level
    if verbose and logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    return undo
