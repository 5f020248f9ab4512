"""Keeping passwords out of messages, reprs and logs."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ._typos import may_hold_secret, unknown_option

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


def redact_parse_error(message: str, keywords: Iterable[str] = (), text: str = "") -> str:
    """A libpq conninfo parse error, with nothing of the input in it that may be secret.

    When parsing fails, nobody knows which fragment was the password, and libpq quotes the
    fragment it choked on (``invalid percent-encoded token: "s3cr%t"``). A quote inside the
    password breaks any pairing of quotes, so everything from the first quote on is dropped.
    An unknown option (libpq's "invalid connection option" or "invalid URI query parameter") is
    named when it was a keyword argument (*keywords*) or when *text*, the string parsed, holds
    nothing that could be a password; otherwise only a near miss is named, by the keyword it
    misses (`safepg._typos.unknown_option`).
    """
    message = message.strip().splitlines()[0] if message.strip() else "unknown error"
    # libpq's own quoted characters are not input: keep them, so the message stays useful.
    for literal in ('"]"', '"="', '"?"', '"/"'):
        message = message.replace(literal, literal.replace('"', "'"))
    head, quote, rest = message.partition('"')
    if not quote:
        return redact(message)
    if head.startswith(("invalid connection option", "invalid URI query parameter")):
        name = rest.partition('"')[0]
        show = name in set(keywords) or (bool(text) and not may_hold_secret(text))
        return unknown_option(name, show=show)
    return f"{head.rstrip(': ')} (the text is not shown: it may hold part of a password)"
