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
import os
import sys
from collections.abc import Sequence

import psycopg

from .. import __version__
from . import bundles, ca, check, demo, env, inspect, providers
from ._output import EXIT_OK, EXIT_USAGE, Output, log_to_stderr

__all__ = ["main"]

# In the order --help lists them.
COMMANDS = (check, inspect, ca, env, providers, bundles, demo)


def parser() -> argparse.ArgumentParser:
    """The argument parser, with every command of `COMMANDS`."""
    top = argparse.ArgumentParser(
        prog="safepg", description="PostgreSQL connections that are always verified."
    )
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
    args = top.parse_args(argv)
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
