"""Showing text that came from the network: escaped, so that it cannot forge output.

A certificate's names, a server's chain and libpq's messages that quote them are written by
whoever holds the other end of the connection, before anything is verified. Printed raw, a
common name such as ``"\\nlibpq said: OK\\x1b[32m"`` forges log lines and drives terminals.
`shown` makes such text inert; callers also mark it "(unverified)" where it was not verified.
"""

from __future__ import annotations

import re

# What is escaped: the backslash (so that an escape cannot be forged either), and every character
# Python does not deem printable: C0 and C1 controls, DEL, the Unicode format characters that
# reorder or hide text (bidi overrides and isolates, zero-width marks, tag characters), line and
# paragraph separators, spaces other than U+0020, surrogates, private-use and unassigned code
# points. The pattern finds candidates quickly; `str.isprintable` decides.
_CANDIDATE = re.compile(r"[^ -\[\]-~]")


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str) -> str:
    """*text* with every control and invisible formatting character escaped (``\\x1b``)."""
    return _CANDIDATE.sub(_escape, text)


def shown_lines(text: str) -> str:
    """*text* escaped line by line, for libpq's messages: its line breaks and the tabs that
    indent its hints stay readable; everything else that could forge output is escaped."""
    return "\n".join(shown(line.replace("\t", "    ")) for line in text.split("\n"))
