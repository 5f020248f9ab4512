"""The ``safepg`` command line.

Each command is a module here with a ``register(commands)`` that adds its parser and sets its
``run(args, out) -> int``; `_output` is what they share (the JSON document, human output,
escaping, exit codes). A new command is one module, added to `COMMANDS`.

Exit codes (stable, for scripts and monitoring):

- 0: verified (``check``), or everything checked out (``inspect``, and the other commands);
- 1: could not connect for a reason other than security: unreachable, refused, timed out,
  authentication failed;
- 2: usage or configuration error (bad arguments, a bad CA file, a socket host, a host whose
  provider's CA must be given: ``ca``, ``env``);
- 3: the server could not be verified: host name mismatch, untrusted or expired certificate,
  no TLS; or a CA bundle failed its checks (``bundles``);
- 4: ``inspect`` only: all is well, but a certificate expires within 30 days.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from typing import NoReturn

import psycopg

from .. import __version__
from . import bundles, ca, check, demo, env, inspect, providers
from ._output import EXIT_OK, EXIT_USAGE, Output, log_to_stderr

__all__ = ["main"]

# In the order --help lists them.
COMMANDS = (check, inspect, ca, env, providers, bundles, demo)
USAGE_SCHEMA = "safepg.usage/1"

# --json was among the arguments being parsed: a usage error is then a JSON document too.
_json_requested: ContextVar[bool] = ContextVar("safepg_cli_json", default=False)
# A value in argparse's message that holds '@' (user-info: app:secret@db) is withheld.
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.S)
_INVALID_CHOICE = re.compile(r"invalid choice: (.*?)( \(choose from .*)?$", re.S)
_INVALID_VALUE = re.compile(r"(invalid [\w ]+ value): .*$", re.S)
_AT_VALUE = re.compile(r"""'[^']*@[^']*'|\S*@\S*""")


def usage_message(message: str) -> str:
    """argparse's *message*, fit to show: passwords and user-info withheld, escaped."""
    from .._redact import redact
    from .._text import shown

    unrecognized = _UNRECOGNIZED.match(message)
    if unrecognized:  # an unquoted URL's password with spaces would come back word by word
        count = len(unrecognized.group(1).split())
        return f"unrecognized arguments ({count}, not shown: quote a URL or conninfo)"
    # A value argparse quotes back (a URL given where a command belongs): never shown.
    message = _INVALID_CHOICE.sub(r"invalid choice (the value is not shown)\2", message)
    message = _INVALID_VALUE.sub(r"\1 (the value is not shown)", message)
    return shown(_AT_VALUE.sub("(a value holding '@', not shown)", redact(message)))


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors withhold what may be a password, and are one JSON
    document when ``--json`` was given."""

    def error(self, message: str) -> NoReturn:
        text = usage_message(message)
        if _json_requested.get():
            command = self.prog.removeprefix("safepg").strip() or None
            doc = {
                "schema": USAGE_SCHEMA,
                "ok": False,
                "exit_code": EXIT_USAGE,
                "error": {"class": "UsageError", "message": text},
                "command": command,
            }
            print(json.dumps(doc, indent=2))
            self.exit(EXIT_USAGE)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {text}\n")


def parser() -> argparse.ArgumentParser:
    """The argument parser, with every command of `COMMANDS`."""
    top = _Parser(prog="safepg", description="PostgreSQL connections that are always verified.")
    top.add_argument("--version", action="version", version=f"safepg {__version__}")
    top.add_argument(
        "-v", "--verbose", action="store_true", help="log safepg's decisions on stderr"
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safepg`` command line; returns the exit code."""
    top = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    token = _json_requested.set("--json" in argv)
    try:
        args = top.parse_args(argv)
    finally:
        _json_requested.reset(token)
    if args.command is None:
        top.print_help()
        return EXIT_USAGE
    out = Output(args.command, getattr(args, "json", False))
    undo = log_to_stderr(args.verbose)
    try:
        code: int = args.run(args, out)
    except psycopg.Error as ex:  # one a command did not expect: still its document, or stderr
        return out.fail(ex)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away: safepg providers | head
        # Python flushes stdout at exit, which would fail again and print a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    finally:
        undo()
    return code
