"""Keeping passwords out of messages, reprs and logs."""

from __future__ import annotations

import re
from collections.abc import Iterable

# user:PASSWORD@ in a URL.
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^@\s]*(@)")
# password=... and sslpassword=... in a conninfo string or a URL query.
_KV_PASSWORD = re.compile(r"""(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'"]+)""", re.I)
# Secrets shorter than this are not searched for in free text: replacing every "ab" would
# garble the message, and libpq's connection errors never echo a password anyway.
_MIN_SECRET_LEN = 4


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Replace passwords in *text* with ``***``: URL user-info, ``password=``, and *secrets*."""
    text = _URL_PASSWORD.sub(r"\1***\2", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            text = text.replace(secret, "***")
    return text


def redact_parse_error(message: str) -> str:
    """A libpq conninfo parse error, with every quoted fragment of the input removed.

    When parsing fails, nobody knows which fragment was the password, and libpq quotes the
    fragment it choked on (``invalid percent-encoded token: "s3cr%t"``). Only an invalid keyword
    is kept, since keywords are not secret.
    """
    message = message.strip()
    if message.startswith("invalid connection option"):
        return message
    return re.sub(r'"[^"]*"', '"…"', redact(message))
