"""safepg's private cache directory, for trust files it has to write (never for anything secret).

libpq reads some of these files as ``sslrootcert``, by path, after safepg wrote them. Whoever can
replace such a file, or the directory it is in, or any directory above it, chooses which servers
libpq trusts. So:

- A directory is used only when every directory from ``/`` down to it is owned by root or this
  user and cannot be written by group or others. A root-owned directory with the sticky bit
  (``/tmp``) is accepted above it, where nobody else can rename what this user made; never as
  the cache itself. The check runs on the resolved path, and that path is the one handed out.
- The chain is checked again on every use, by ``lstat`` of each directory (a few µs): a change
  of owner, mode or inode anywhere makes safepg check it all again.
- Files are created under random names with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600,
  checked through the open descriptor, then renamed into place. The final names are
  content-addressed and so guessable; that is harmless because nobody else can create an entry
  in a directory that passed the check. A file read back is opened with ``O_NOFOLLOW`` and must
  be a regular file of this user's, with one link and no group or other access bits.
- Each file safepg wrote or checked is remembered with its inode, size and mtime; `unchanged`
  compares them again before the file is handed to libpq once more.

When the directory cannot be made safe, `usable` returns None and warns once: callers then do
without the cache (the fast path uses the caller's full trust file), or fail with the error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from ._environ import getenv
from ._errors import ConfigurationError

logger = logging.getLogger("safepg")

# A directory's or file's identity for re-checks: inode, owner and mode (files: size, mtime too).
_DirStamp = tuple[int, int, int]
_FileStamp = tuple[int, int, int, int, int]

# directory as asked for -> (its resolved path, the stamp of every directory from / down to it).
_verified: dict[str, tuple[Path, tuple[tuple[str, _DirStamp], ...]]] = {}
# path of a file safepg wrote or checked -> its stamp then.
_written: dict[str, _FileStamp] = {}
_warned: set[str] = set()

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in place of a file must not hang us


def cache_location() -> Path:
    """Where the cache directory is (``SAFEPG_CACHE_DIR``, else platformdirs'), not creating it."""
    override = getenv("SAFEPG_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs  # not at import time: import safepg stays cheap

    return Path(platformdirs.user_cache_dir("safepg"))


def _dir_stamp(st: os.stat_result) -> _DirStamp:
    return (st.st_ino, st.st_uid, st.st_mode)


def _file_stamp(st: os.stat_result) -> _FileStamp:
    return (st.st_ino, st.st_uid, st.st_mode, st.st_size, st.st_mtime_ns)


def chain_problem(directory: str, *, root_may_own: bool = False) -> str | None:
    """Why another user could change what is in *directory* (a resolved path), or None.

    Every directory from ``/`` down must be owned by root or this user and not writable by
    group or others; ``/tmp``-style directories (root's, sticky) are allowed above it only.
    *directory* itself must be this user's (or root's too, with *root_may_own*).
    """
    if os.name != "posix":  # pragma: no cover - Windows: per-user profile directories
        return None
    euid = os.geteuid()
    path = Path(directory)
    parts = [*reversed(path.parents), path]
    for i, part in enumerate(parts):
        try:
            st = os.lstat(part)
        except OSError as ex:
            return f"{part} cannot be checked ({ex.strerror})"
        mode = stat.S_IMODE(st.st_mode)
        last = i == len(parts) - 1
        if not stat.S_ISDIR(st.st_mode):
            return f"{part} is not a directory (a symbolic link changed after it was resolved?)"
        owners = (euid,) if last and not root_may_own else (0, euid)
        if st.st_uid not in owners:
            return f"{part} belongs to another user (uid {st.st_uid}), who could replace it"
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            sticky_root = bool(mode & stat.S_ISVTX) and st.st_uid == 0 and not last
            if not sticky_root:
                return (
                    f"{part} can be written by other users (mode {mode:o}), who could rename "
                    "what is in it and put their own files in its place"
                )
    return None


def _chain(directory: Path) -> tuple[tuple[str, _DirStamp], ...]:
    return tuple(
        (str(p), _dir_stamp(os.lstat(p))) for p in (*reversed(directory.parents), directory)
    )


def _still_verified(location: str) -> Path | None:
    found = _verified.get(location)
    if found is None:
        return None
    real, chain = found
    try:
        for part, stamp in chain:
            if _dir_stamp(os.lstat(part)) != stamp:
                return None
    except OSError:
        return None
    return real


def private_dir(location: Path, *, what: str = "safepg's cache directory") -> Path:
    """*location*, created with mode 0700 if missing, resolved, and checked to be private.

    Returns the resolved path, which is what must be handed on (a symbolic link above it could
    be changed later; its target cannot). Cheap on repeated calls: the directories are only
    ``lstat``-ed again.

    Raises:
        ConfigurationError: it cannot be created, or another user could change what is in it.
    """
    key = str(location)
    real = _still_verified(key)
    if real is not None:
        return real
    _verified.pop(key, None)
    try:
        location.mkdir(mode=0o700, parents=True, exist_ok=True)
        real = Path(os.path.realpath(location))
    except OSError as ex:
        raise ConfigurationError(
            f"cannot create {what} {location}: {ex.strerror}. Set SAFEPG_CACHE_DIR to a private "
            "directory you can write to."
        ) from None
    problem = chain_problem(str(real))
    if problem is None:
        try:
            chain = _chain(real)
        except OSError as ex:  # pragma: no cover - removed between the two looks
            problem = f"{real} cannot be checked ({ex.strerror})"
    if problem is not None:
        raise ConfigurationError(
            f"{what} {real} is not safe for trust files: {problem}. Use a directory only you "
            "can write to, all the way from / (chmod go-w on the directory named), or set "
            "SAFEPG_CACHE_DIR to one, such as a directory under your home."
        )
    # Under the name asked for, and the resolved one that files are handed out under.
    _verified[key] = _verified[str(real)] = (real, chain)
    return real


def cache_dir() -> Path:
    """The user cache directory, created with mode 0700 and checked to be private.

    ``SAFEPG_CACHE_DIR`` overrides the platformdirs location.

    Raises:
        ConfigurationError: the directory cannot be made, or other users could change it.
    """
    return private_dir(cache_location())


def usable() -> Path | None:
    """`cache_dir`, or None (with a warning, once per location) when it is not safe to use."""
    try:
        return cache_dir()
    except ConfigurationError as ex:
        where = str(cache_location())
        level = logging.DEBUG if where in _warned else logging.WARNING
        _warned.add(where)
        logger.log(level, "safepg: not using the cache: %s", ex)
        return None


def _open_checked(path: Path) -> int:
    """A read-only descriptor for *path*, if it is a regular file of ours that nobody else
    could have written. Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    try:
        st = os.fstat(fd)
        if os.name == "posix" and (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_nlink != 1
            or st.st_mode & 0o077
        ):
            raise OSError(f"{path} is not a private file of this user's")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(path: Path) -> tuple[bytes, _FileStamp]:
    fd = _open_checked(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(), _file_stamp(os.fstat(f.fileno()))


def read_private_file(path: Path) -> bytes:
    """The content of a file safepg wrote in a private directory; OSError if it is not one."""
    return _read(path)[0]


def write_private_file(path: Path, data: bytes) -> None:
    """Replace *path* atomically with *data*, readable by this user only (mode 0600).

    The directory must pass `private_dir`. Readers see the old file or the new one, never a
    partial write, even across processes. There is no fsync: after a crash a file may be empty
    or short, and every reader checks what it reads (a trust file's content must hash to its
    name; an entry must parse and hold only known fingerprints), so a damaged file is made again.

    Raises:
        ConfigurationError: the directory is not private, or the file was swapped while written.
        OSError: the file cannot be written.
    """
    directory = private_dir(path.parent)
    path = directory / path.name
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600, a random name.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            made = os.fstat(f.fileno())
        if os.name == "posix" and (made.st_uid != os.geteuid() or made.st_mode & 0o077):
            raise ConfigurationError(f"{tmp} was not created private")  # pragma: no cover
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    now = os.lstat(path)
    if now.st_ino != made.st_ino:
        # Another writer of this user's (a thread, a process) replaced it since: nobody else
        # can in a private directory. Keep it only if it is private and holds the same bytes.
        try:
            again, stamp = _read(path)
        except OSError:
            again, stamp = b"", None
        if again != data or stamp is None:
            raise ConfigurationError(f"{path} was replaced while safepg wrote it")
        _written[str(path)] = stamp
        return
    _written[str(path)] = _file_stamp(now)


def unchanged(path: str) -> bool:
    """*path* is a file safepg wrote or checked, its directories are still private, and it has
    not changed since (same inode, owner, mode, size and mtime)."""
    stamp = _written.get(path)
    if stamp is None:
        return False
    try:
        if _file_stamp(os.lstat(path)) != stamp:
            return False
    except OSError:
        return False
    directory = os.path.dirname(path)
    if _still_verified(directory) is not None:
        return True
    try:
        private_dir(Path(directory))  # changed: check it all again
    except ConfigurationError:
        return False
    return True


def write_trust_file(stem: str, pem: bytes) -> Path:
    """Store *pem* as ``<stem>-<sha256>.pem`` in the cache directory and return its path.

    An existing file of that name is reused only when it is a private file of this user's whose
    content still hashes to its name; anything else (a partial write, tampering) is replaced.

    Raises:
        ConfigurationError: the cache directory is not safe to use.
        OSError: the file cannot be written.
    """
    digest = hashlib.sha256(pem).hexdigest()
    path = cache_dir() / f"{stem}-{digest[:32]}.pem"
    if unchanged(str(path)):
        return path
    try:
        data, stamp = _read(path)
        if hashlib.sha256(data).hexdigest() == digest:
            _written[str(path)] = stamp
            return path
    except OSError:
        pass
    write_private_file(path, pem)
    return path


def existing_trust_file(name: str, sha256: str) -> Path | None:
    """The trust file *name* that `write_trust_file` made, if it is still a private file of
    this user's, in the private cache directory, whose content hashes to *sha256* (and *name*
    is ``<stem>-<first 32 hex digits of sha256>.pem``); None otherwise."""
    stem, _, rest = name.partition("-")
    if (
        not stem.isalpha()
        or rest != f"{sha256[:32]}.pem"
        or len(sha256) != 64
        or any(c not in "0123456789abcdef" for c in sha256)
    ):
        return None
    directory = usable()
    if directory is None:
        return None
    path = directory / name
    if unchanged(str(path)):
        return path
    try:
        data, stamp = _read(path)
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    _written[str(path)] = stamp
    return path


def clear_memory() -> None:
    """Forget which directories and files were checked (the next use checks them again)."""
    _verified.clear()
    _written.clear()
    _warned.clear()
