"""safepg's private cache directory, for trust files it has to write (never for anything secret).

Files are content-addressed and written atomically with user-only permissions. A directory that
other users can write to is refused: they could swap a trust file under us.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from ._errors import ConfigurationError

_checked: set[str] = set()


def cache_location() -> Path:
    """Where the cache directory is (``SAFEPG_CACHE_DIR``, else platformdirs'), not creating it."""
    override = os.environ.get("SAFEPG_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs  # not at import time: import safepg stays cheap

    return Path(platformdirs.user_cache_dir("safepg"))


def cache_dir() -> Path:
    """The user cache directory, created with mode 0700 and checked to be private.

    ``SAFEPG_CACHE_DIR`` overrides the platformdirs location.

    Raises:
        ConfigurationError: the directory cannot be made, or other users can write to it.
    """
    path = cache_location()
    key = str(path)
    if key in _checked and path.is_dir():
        return path
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as ex:
        raise ConfigurationError(
            f"cannot create safepg's cache directory {path}: {ex.strerror}. "
            "Set SAFEPG_CACHE_DIR to a private directory you can write to."
        ) from None
    if os.name == "posix" and (
        st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise ConfigurationError(
            f"safepg's cache directory {path} is not private (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): other users could replace the trust files in it. "
            f"Run 'chmod 700 {path}' as its owner, or set SAFEPG_CACHE_DIR to a private directory."
        )
    _checked.add(key)
    return path


def write_trust_file(stem: str, pem: bytes) -> Path:
    """Store *pem* as ``<stem>-<sha256>.pem`` in the cache directory and return its path.

    An existing file of that name is reused only when its content still hashes to its name;
    anything else (a partial write, tampering) is replaced.
    """
    digest = hashlib.sha256(pem).hexdigest()
    path = cache_dir() / f"{stem}-{digest[:32]}.pem"
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            return path
    except OSError:
        pass
    write_private_file(path, pem)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Replace *path* atomically with *data*, readable by this user only (mode 0600).

    Readers see the old file or the new one, never a partial write, even across processes.
    There is no fsync: after a crash a file may be empty or short, and every reader checks what
    it reads (a trust file's content must hash to its name; an entry must parse and hold only
    known fingerprints), so a damaged file is simply made again.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
