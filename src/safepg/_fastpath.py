"""The fast path: give libpq only the trust anchors that can verify each host.

libpq reads and parses the whole ``sslrootcert`` file on every connection. For the large sets
safepg resolves by default (the OS store, certifi, the RDS bundle: 100-150 roots) that makes a
verified connect 2-6 times slower than ``sslmode=require``. So, once per host:

1. The first connect goes to libpq with the full set. Once libpq has verified the session,
   safepg reads the chain it verified from the live session (`_libpq.presented_chain`). Only
   where that cannot be done (another TLS library), and for a single host, a probe in a
   background thread reads the chain the server presents; it verifies nothing.
2. From the *full* set, safepg takes the certificates whose subject is the issuer of a
   certificate of that chain, and then their issuers in the set, up to the roots.
3. Those anchors go into a small file, which libpq gets as ``sslrootcert``. libpq still does the
   whole verify-full check against it.

The small file is a subset of the full set by construction: it is rebuilt from the full set by
SHA-256 fingerprint, and a cache entry naming a fingerprint the full set lacks is ignored. A file
whose content no longer hashes to its name (tampering, a partial write) is rewritten. If libpq
rejects the chain with the small file (the server moved to another root of the set), the caller
retries once with the full set and the host is learned again (see `forget`).

With libpq 17+, the first connect also records whether the host takes direct TLS (a
PostgreSQL 17+ server does), and warm connects then use ``sslnegotiation=direct``. A multi-host
plan is narrowed only once a verified session has been seen on each host, and forgotten when a
narrowed connect lands on another host than the first (see `check_landing`).

What is learned is kept in memory and in safepg's private cache directory, keyed by host,
host address, port, SNI, negotiation and the digest of the full set, so a changed set never
reuses an old answer. ``SAFEPG_FAST_PATH=0`` or ``connect(..., fast_path=False)`` turns it off.

A process that has not parsed the full set yet starts warm from the disk cache (`_warm_start`):
the set's stat key and digest, recorded by a process that parsed it, stand in for parsing it,
and a background thread then checks what a parsing process checks (`_verify`).

Every driver takes the same `Route` for a connect (psycopg, sync and async, its pools and
engines, and psycopg2): the route yields the attempts, decides what to retry after a failure,
and what to learn from a verified session. The drivers only run libpq and tell the route how
it went.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeGuard, TypeVar

from psycopg import pq

from . import _cache, _diagnose, _fetch, _password, _trust, _x509
from ._deadline import Deadline
from ._environ import getenv
from ._errors import ConfigurationError, SafePGError
from ._params import Plan, Target, as_bool
from ._trust import TrustSource

logger = logging.getLogger("safepg")
C = TypeVar("C")

ENV_SWITCH = "SAFEPG_FAST_PATH"
# A host that could not be probed is not probed again for this long (the full set is used).
_RETRY_AFTER = 60.0
# A probe never waits forever (the connect path passes its own budget, see _deadline).
_DEFAULT_TIMEOUT = 10.0
_ENTRY_VERSION = 1
# PostgreSQL 17 is the first server to accept TLS without the SSLRequest.
_DIRECT_TLS_SERVER = 170000
# libpq 17 is the first to know sslnegotiation=direct.
_DIRECT_TLS_LIBPQ = 170000
# A fresh start's background check of the full set waits this long (seconds) before parsing it.
_CHECK_DELAY = 0.05


def enabled(option: object) -> bool:
    """The caller's ``fast_path`` argument, else ``SAFEPG_FAST_PATH`` (on when unset or empty).

    Raises:
        ConfigurationError: either is not a boolean (true/false, 1/0, yes/no, on/off).
    """
    if option is not None:
        return as_bool("fast_path", option)
    value = getenv(ENV_SWITCH) or ""
    return as_bool(ENV_SWITCH, value, where=" (environment)") if value.strip() else True


# --- the full set, indexed once per file version ---------------------------------------------


@dataclass(frozen=True)
class _Index:
    digest: str  # over the sorted fingerprints: the identity of the set, whatever its order
    by_fingerprint: dict[str, _x509.Cert]
    by_subject: dict[bytes, tuple[_x509.Cert, ...]]


_StatKey = tuple[int, int, int, int]
_indexes: dict[str, tuple[_StatKey, _Index]] = {}
# Full sets this process has not parsed yet, known from a trust record on disk (see
# `_warm_start`): path -> its stat key and digest as recorded.
_known: dict[str, tuple[_StatKey, str]] = {}


def _digest(path: str) -> str | None:
    """The digest of the full set at *path*, if known in this process for its current stat key:
    parsed here, or recorded by a process that parsed it (`_warm_start`)."""
    key = _trust.file_key(path)
    if key is None:
        return None
    parsed = _indexes.get(path)
    if parsed is not None and parsed[0] == key:
        return parsed[1].digest
    known = _known.get(path)
    if known is not None and known[0] == key:
        return known[1]
    return None


def _index(path: str) -> _Index | None:
    key = _trust.file_key(path)
    if key is None:
        return None
    memo = _indexes.get(path)
    if memo is not None and memo[0] == key:
        return memo[1]
    try:
        with open(path, "rb") as f:
            certs = _x509.parse_pem(f.read())
    except OSError:
        return None
    by_fp = {c.sha256: c for c in certs}
    by_subject: dict[bytes, tuple[_x509.Cert, ...]] = {}
    for c in by_fp.values():
        by_subject[c.subject] = (*by_subject.get(c.subject, ()), c)
    digest = hashlib.sha256("\n".join(sorted(by_fp)).encode()).hexdigest()
    index = _Index(digest, by_fp, by_subject)
    _indexes[path] = (key, index)
    return index


def anchors_for(chain: Sequence[bytes], index: _Index) -> list[_x509.Cert]:
    """The certificates of *index* that can anchor *chain*: its issuers, then theirs, to roots."""
    wanted: list[bytes] = []
    for der in chain:
        try:
            wanted.append(_x509.parse_der(der).issuer)
        except ValueError:
            continue
    chosen: dict[str, _x509.Cert] = {}
    seen: set[bytes] = set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for cert in index.by_subject.get(name, ()):
            chosen[cert.sha256] = cert
            if not cert.self_issued:
                wanted.append(cert.issuer)
    return [chosen[fp] for fp in sorted(chosen)]


# --- what is learned per host ----------------------------------------------------------------


@dataclass(frozen=True)
class _HostKey:
    host: str
    hostaddr: str
    port: str
    sni: bool
    direct: bool
    trust_digest: str

    def filename(self) -> str:
        text = json.dumps(
            [self.host, self.hostaddr, self.port, self.sni, self.direct, self.trust_digest]
        )
        return f"host-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _host_keys(plan: Plan, digest: str) -> tuple[_HostKey, ...]:
    opts = plan.resolved
    return _keys_for(
        plan.targets,
        opts.get("sslsni", "1") != "0",
        opts.get("sslnegotiation") == "direct",
        digest,
    )


@functools.lru_cache(maxsize=64)
def _keys_for(
    targets: tuple[Target, ...], sni: bool, direct: bool, digest: str
) -> tuple[_HostKey, ...]:
    """The host keys of *targets*, made once per warm plan (a connect looks them up)."""
    return tuple(_HostKey(t.host, t.hostaddr or "", t.port, sni, direct, digest) for t in targets)


@dataclass(frozen=True)
class _Learned:
    anchors: tuple[str, ...]
    direct: bool | None = None  # takes direct TLS (PostgreSQL 17+); None: not known yet


def _read_json(name: str) -> dict[str, object] | None:
    """A JSON object safepg wrote in its private cache directory, or None."""
    directory = _cache.usable()
    if directory is None:
        return None
    try:
        entry = json.loads(_cache.read_private_file(directory / name))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    return entry if isinstance(entry, dict) else None


def _write_json(name: str, entry: dict[str, object], what: str) -> None:
    directory = _cache.usable()
    if directory is None:
        return
    try:
        _cache.write_private_file(directory / name, json.dumps(entry, indent=1).encode())
    except (OSError, ConfigurationError) as ex:
        logger.debug("safepg: cannot store %s: %s", what, ex)


def _remove(*names: str) -> None:
    directory = _cache.usable()
    if directory is None:
        return
    for name in names:
        with contextlib.suppress(OSError):
            (directory / name).unlink(missing_ok=True)


def _read_entry(key: _HostKey, index: _Index | None) -> _Learned | None:
    """What was learned for *key*, from the disk cache, if the entry is sound. Without *index*
    (a warm start, see `_warm_start`), the subset check waits for `_verify_later`."""
    entry = _read_json(key.filename())
    if entry is None:
        return None
    try:
        ok = (
            entry.get("version") == _ENTRY_VERSION
            and entry.get("host") == key.host
            and entry.get("hostaddr") == key.hostaddr
            and entry.get("port") == key.port
            and entry.get("trust_digest") == key.trust_digest
        )
        raw = entry.get("anchors")
        anchors: tuple[object, ...] = tuple(raw) if ok and isinstance(raw, list) else ()
        direct = entry.get("direct_tls")
    except (ValueError, TypeError):
        return None
    if not anchors or not all(
        isinstance(a, str) and (a in index.by_fingerprint if index else _is_fingerprint(a))
        for a in anchors
    ):
        # Subset only: a fingerprint the full set lacks means the entry was tampered with, or
        # belongs to another set. Ignore it; the host is learned again.
        logger.debug("safepg: ignoring the learned anchors in %s", key.filename())
        return None
    return _Learned(tuple(str(a) for a in anchors), direct if isinstance(direct, bool) else None)


def _is_fingerprint(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _write_entry(key: _HostKey, learned: _Learned) -> None:
    entry: dict[str, object] = {
        "version": _ENTRY_VERSION,
        "host": key.host,
        "hostaddr": key.hostaddr,
        "port": key.port,
        "sni": key.sni,
        "direct": key.direct,
        "trust_digest": key.trust_digest,
        "anchors": list(learned.anchors),
        "direct_tls": learned.direct,
        "learned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(key.filename(), entry, f"what was learned for {key.where()}")


# --- records that let a fresh process start warm --------------------------------------------
#
# A trust record (per full set path) holds the set's stat key and digest as a process that
# parsed it saw them; a plan record (per tuple of host keys, which hold that digest) names the
# small file built for those hosts, with its SHA-256. See `_warm_start`.


def _trust_record_name(path: str) -> str:
    return f"trust-{hashlib.sha256(os.fsencode(path)).hexdigest()[:32]}.json"


def _plan_record_name(keys: tuple[_HostKey, ...]) -> str:
    names = json.dumps([k.filename() for k in keys])
    return f"plan-{hashlib.sha256(names.encode()).hexdigest()[:32]}.json"


def _write_records(
    full: TrustSource, keys: tuple[_HostKey, ...], anchors: Sequence[str], source: TrustSource
) -> None:
    parsed = _indexes.get(full.path)
    if parsed is None:
        return
    stat_key, index = parsed
    trust_record: dict[str, object] = {
        "version": _ENTRY_VERSION,
        "path": full.path,
        "stat": list(stat_key),
        "digest": index.digest,
    }
    _write_json(_trust_record_name(full.path), trust_record, f"the digest of {full.path}")
    _trust.record_checked(full.path)
    small_sha = None
    if source.path != full.path:
        try:
            small_sha = hashlib.sha256(_cache.read_private_file(Path(source.path))).hexdigest()
        except OSError:
            return
    plan_record: dict[str, object] = {
        "version": _ENTRY_VERSION,
        "hosts": [k.filename() for k in keys],
        "anchors": sorted(anchors),
        "file": os.path.basename(source.path) if small_sha else None,
        "sha256": small_sha,
    }
    _write_json(_plan_record_name(keys), plan_record, "the small file's name")


def _warm_start(plan: Plan, libpq: int) -> Plan | None:
    """*plan* narrowed from the records on disk, without parsing the full set: for a process
    that has not parsed it yet, and finds a valid learned entry for each host.

    Checked here, before libpq gets the small file: the full set's stat key (device, inode,
    size, mtime in ns) equals the one recorded with its digest (as in a process that parsed it,
    where a changed stat key means parsing it again); each host's entry is sound and holds that
    digest; the plan record lists the same anchors as the entries; and the small file is a
    private file of this user's whose content hashes to the SHA-256 recorded. Then, in a
    background thread, `_verify_later` parses the full set and checks what a process that
    parsed it would have checked (the digest, anchors that are a subset of the set, the small
    file's certificates): if anything differs, all of it is forgotten.
    """
    full = plan.trust
    record = _read_json(_trust_record_name(full.path))
    stat_key = _trust.file_key(full.path)
    if record is None or stat_key is None:
        return None
    digest = record.get("digest")
    if (
        record.get("version") != _ENTRY_VERSION
        or record.get("path") != full.path
        or record.get("stat") != list(stat_key)
        or not isinstance(digest, str)
        or not _is_fingerprint(digest)
    ):
        return None
    keys = _host_keys(plan, digest)
    learned = [_read_entry(k, None) for k in keys]
    items = [item for item in learned if item is not None]
    if len(items) != len(keys):
        return None
    anchors = sorted({a for item in items for a in item.anchors})
    record = _read_json(_plan_record_name(keys))
    if (
        record is None
        or record.get("version") != _ENTRY_VERSION
        or record.get("hosts") != [k.filename() for k in keys]
        or record.get("anchors") != anchors
    ):
        return None
    name, sha = record.get("file"), record.get("sha256")
    if name is None and sha is None:
        source = full  # the whole set was learned: the caller's own file
    elif isinstance(name, str) and isinstance(sha, str):
        path = _cache.existing_trust_file(name, sha)
        if path is None:
            return None
        source = TrustSource(str(path), _label(full, len(anchors), keys), full.origin)
    else:
        return None
    small_key = _trust.file_key(source.path)
    if small_key is None:
        return None
    # Its check first, then what it checks into memory: a fork in between (another thread)
    # then finds it among what a child forgets (`_after_fork`).
    _verify_later(plan, keys, digest, anchors, source)
    _known[full.path] = (stat_key, digest)
    direct = _direct_of(items)
    _memo[keys] = (source, small_key, direct)
    logger.debug(
        "safepg: fast path: warm (disk cache) for %s, a fresh start: checking %s in the background",
        ", ".join(k.where() for k in keys),
        full,
    )
    return _narrowed(plan, source, direct, libpq)


# What a check covers: the full set's path, the hosts, and what their records said (digest,
# anchors, small file). A fresh start from other records (changed on disk meanwhile) is
# another check, never covered by one that is running.
_Check = tuple[str, tuple[_HostKey, ...], str, tuple[str, ...], str]
# Fresh starts not checked yet, with the call that starts their check. An entry stays until its
# check ends: a forked child, which has none of its parent's threads, forgets them (`_after_fork`)
# and reads the disk again.
_unchecked: dict[_Check, Callable[[], None]] = {}
_checking: set[_Check] = set()
# Checks of a fresh start, not started yet: they start once the connect that used the small file
# is over (`Route.verified`, `Route.failed`), so that parsing the set in a thread does not hold
# the GIL while that connect runs.
_pending: list[Callable[[], None]] = []
# One check at a time: a second check of the same set finds it parsed (`_index`).
_check_lock = threading.Lock()


def _verify_later(
    plan: Plan, keys: tuple[_HostKey, ...], digest: str, anchors: Sequence[str], source: TrustSource
) -> None:
    def start() -> None:
        _start_check(plan, keys, digest, anchors, source)

    with _locks_guard:
        _unchecked[_check_of(plan, keys, digest, anchors, source)] = start
    _pending.append(start)


def _check_of(
    plan: Plan, keys: tuple[_HostKey, ...], digest: str, anchors: Sequence[str], source: TrustSource
) -> _Check:
    return (plan.trust.path, keys, digest, tuple(anchors), source.path)


def _start_pending() -> None:
    while _pending:
        try:
            start = _pending.pop()
        except IndexError:  # another thread took the last one
            return
        start()


def _forget_unchecked(plan: Plan, keys: tuple[_HostKey, ...]) -> None:
    _known.pop(plan.trust.path, None)
    _drop(keys, plan.trust.path)


def _start_check(
    plan: Plan, keys: tuple[_HostKey, ...], digest: str, anchors: Sequence[str], source: TrustSource
) -> None:
    what = _check_of(plan, keys, digest, anchors, source)
    with _locks_guard:
        if what in _checking or what not in _unchecked:
            return  # running, or over
        _checking.add(what)

    def run() -> None:
        try:
            # Parsing the set holds the GIL for milliseconds: not while the caller's thread
            # finishes the connect that started this check.
            time.sleep(_CHECK_DELAY)
            with _check_lock:
                _verify(plan, keys, digest, anchors, source)
        except Exception as ex:  # whatever it was, nothing is kept unchecked
            logger.warning("safepg: cannot check the fast path's records (%s); forgetting them", ex)
            _forget_unchecked(plan, keys)
        finally:
            with _locks_guard:
                _checking.discard(what)
                _unchecked.pop(what, None)

    # Not threading.Thread.start(): it waits until the new thread runs, which can cost the
    # caller's connect milliseconds (a GIL hand-over). This thread needs no joining: like a
    # daemon thread, it is stopped at exit; a forked child forgets what it had not checked.
    try:
        _thread.start_new_thread(run, ())
    except Exception as ex:  # no thread can be started (limits, memory): nothing stays unchecked
        logger.warning(
            "safepg: cannot start the check of the fast path's records (%s); forgetting them", ex
        )
        _forget_unchecked(plan, keys)
        with _locks_guard:
            _checking.discard(what)
            _unchecked.pop(what, None)


def checks_done(timeout: float) -> bool:
    """Wait up to *timeout* seconds until no check of a fresh start runs; whether none does.
    For tests and benchmarks: the checks run in threads that are not joined."""
    end = time.monotonic() + timeout
    while True:
        with _locks_guard:
            if not _checking:
                return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.002)


def _verify(
    plan: Plan, keys: tuple[_HostKey, ...], digest: str, anchors: Sequence[str], source: TrustSource
) -> None:
    """`_warm_start`'s second half: what a process that parsed the full set checks."""
    index = _index(plan.trust.path)
    problem = None
    if index is None:
        problem = "it cannot be read"
    elif index.digest != digest:
        problem = "it changed since it was recorded"
    elif not all(a in index.by_fingerprint for a in anchors):
        problem = "the learned anchors are not all in it"
    elif source.path != plan.trust.path:
        try:
            data = _cache.read_private_file(Path(source.path))  # a private file, never a FIFO
            small = {c.sha256 for c in _x509.parse_pem(data)}
        except OSError:
            small = set()
        if small != set(anchors):
            problem = "the small file holds other certificates"
    if index is not None and problem is None:
        _x509.warn_if_expiring([index.by_fingerprint[a] for a in anchors], plan.trust.label)
        return
    logger.warning(
        "safepg: what was learned for %s does not match the trust set %s (%s); it is "
        "forgotten, and the next connect uses the full set",
        ", ".join(k.where() for k in keys),
        plan.trust,
        problem,
    )
    _known.pop(plan.trust.path, None)
    _drop(keys, plan.trust.path)


def _drop(keys: tuple[_HostKey, ...], trust_path: str | None = None) -> None:
    _memo.pop(keys, None)
    names = [k.filename() for k in keys] + [_plan_record_name(keys)]
    _remove(*names, *([_trust_record_name(trust_path)] if trust_path else []))


def _label(full: TrustSource, count: int, keys: Sequence[_HostKey]) -> str:
    where = ", ".join(k.where() for k in keys)
    return f"{full.label}, narrowed to the {count} anchor(s) that verify {where}"


# --- the small files, per plan -----------------------------------------------------------------

# host keys (holding the full set's digest) -> the trust to use, its stat key, and whether
# every host takes direct TLS (None: not known yet for one of them).
_memo: dict[tuple[_HostKey, ...], tuple[TrustSource, _StatKey, bool | None]] = {}
# host key -> when it may be probed again, after a probe that taught nothing.
_unlearnable: dict[_HostKey, float] = {}
_locks: dict[tuple[_HostKey, ...], threading.Lock] = {}
_locks_guard = threading.Lock()


def libpq_has_direct(libpq: int | None = None) -> bool:
    """This libpq (psycopg's, unless *libpq* gives another's version) knows
    sslnegotiation=direct (17+); older ones reject the keyword."""
    return (pq.version() if libpq is None else libpq) >= _DIRECT_TLS_LIBPQ


def auto_direct(plan: Plan, libpq: int | None = None) -> bool:
    """Learn and use direct TLS for *plan*: not chosen by the caller either way, libpq >= 17."""
    return plan.direct_tls is None and not plan.negotiation_chosen and libpq_has_direct(libpq)


def _tcp_only(plan: Plan) -> bool:
    return bool(plan.targets) and not any(t.socket for t in plan.targets)


def _applicable(plan: Plan, libpq: int | None = None) -> tuple[_Index, tuple[_HostKey, ...]] | None:
    if not _tcp_only(plan):
        return None
    index = _index(plan.trust.path)
    if index is None:
        return None
    if len(index.by_fingerprint) <= 1 and not auto_direct(plan, libpq):
        return None  # nothing to gain: the set is as small as it gets, no direct TLS to learn
    return index, _host_keys(plan, index.digest)


def _narrowed(plan: Plan, source: TrustSource, direct: bool | None, libpq: int | None) -> Plan:
    """*plan* with the learned anchors and negotiation: made once per plan (`Plan.derived`)."""
    key = ("narrowed", source, direct, libpq)
    found: Plan | None = plan.derived.get(key)
    if found is None:
        found = plan.derived[key] = _narrow(plan, source, direct, libpq)
    return found


def _narrow(plan: Plan, source: TrustSource, direct: bool | None, libpq: int | None) -> Plan:
    params = {**plan.params, "sslrootcert": source.path}
    auto = auto_direct(plan, libpq)
    if auto and direct:
        params["sslnegotiation"] = "direct"
    return replace(
        plan,
        params=params,
        trust=source,
        learned_direct=bool(auto and direct),
        direct_unknown=auto and direct is None,
    )


def _direct_of(learned: Sequence[_Learned]) -> bool | None:
    flags = {item.direct for item in learned}
    return False if False in flags else (None if None in flags else True)


def _build(
    plan: Plan,
    keys: tuple[_HostKey, ...],
    index: _Index,
    learned: Sequence[_Learned],
    libpq: int | None,
) -> Plan | None:
    fingerprints = sorted({a for item in learned for a in item.anchors})
    direct = _direct_of(learned)
    certs = [index.by_fingerprint[fp] for fp in fingerprints]
    _x509.warn_if_expiring(certs, plan.trust.label)
    if len(fingerprints) == len(index.by_fingerprint):
        source = plan.trust  # already as small as it gets: keep the caller's file
    else:
        pem = b"".join(c.pem() for c in certs)
        if _cache.usable() is None:
            return None  # warned once: the caller's own full set is used
        try:
            path = _cache.write_trust_file("anchors", pem)
        except (OSError, ConfigurationError) as ex:
            logger.debug("safepg: cannot write a small trust file, using the full set: %s", ex)
            return None
        source = TrustSource(
            str(path), _label(plan.trust, len(fingerprints), keys), plan.trust.origin
        )
    stat_key = _trust.file_key(source.path)
    if stat_key is not None:
        _memo[keys] = (source, stat_key, direct)
        _write_records(plan.trust, keys, fingerprints, source)
    return _narrowed(plan, source, direct, libpq)


def _still_good(source: TrustSource, stat_key: _StatKey, full: TrustSource) -> bool:
    """The memoized trust file is as it was: a small file safepg wrote is checked with its
    directories (`_cache.unchanged`); the caller's own file by its stat key."""
    if source.path == full.path:
        return _trust.file_key(source.path) == stat_key
    return _cache.unchanged(source.path)


def cached(plan: Plan, libpq: int | None = None) -> Plan | None:
    """*plan* with what was learned for its hosts, if every one is learned; no network I/O.

    In memory first; in a process that has not parsed the full set yet, from the records on
    disk without parsing it (`_warm_start`); else from the host entries, parsing the set.
    """
    if not _tcp_only(plan):
        logger.debug("safepg: fast path not used: %s", _not_applicable(plan))
        return None
    libpq = pq.version() if libpq is None else libpq
    digest = _digest(plan.trust.path)
    if digest is not None:
        keys = _host_keys(plan, digest)
        memo = _memo.get(keys)
        if memo is not None:
            source, stat_key, direct = memo
            if _still_good(source, stat_key, plan.trust):
                logger.debug("safepg: fast path: warm (in memory), trusting %s", source)
                return _narrowed(plan, source, direct, libpq)
            # Changed on disk: rebuild it from the full set below. pop, not del: another
            # thread may have dropped the entry while this one was looking at the file.
            _memo.pop(keys, None)
    if plan.trust.path not in _indexes:
        fast = _warm_start(plan, libpq)
        if fast is not None:
            return fast
    found = _applicable(plan, libpq)
    if found is None:
        logger.debug("safepg: fast path not used: %s", _not_applicable(plan))
        return None
    index, keys = found
    learned = []
    for key in keys:
        item = _read_entry(key, index)
        if item is None:
            return None
        learned.append(item)
    logger.debug("safepg: fast path: warm (disk cache) for %s", ", ".join(k.where() for k in keys))
    return _build(plan, keys, index, learned, libpq)


def _not_applicable(plan: Plan) -> str:
    if not _tcp_only(plan):
        return "a Unix-domain socket host"
    return f"{plan.trust.path} holds one certificate (as small as it gets), or cannot be read"


def worth_learning(plan: Plan, libpq: int | None = None) -> bool:
    """Whether a connect with the full set should teach the fast path: it applies, and no host
    failed to teach lately."""
    found = _applicable(plan, libpq)
    if found is None:
        return False
    now = time.monotonic()
    return all(_unlearnable.get(k, 0.0) <= now for k in found[1])


def may_learn(plan: Plan, libpq: int | None = None) -> bool:
    """`worth_learning`, without parsing the trust set when it is not parsed yet (then
    `learn_from_session` decides, off an event loop)."""
    if not _tcp_only(plan):
        return False
    return plan.trust.path not in _indexes or worth_learning(plan, libpq)


def _from_chain(
    plan: Plan, key: _HostKey, index: _Index, chain: Sequence[bytes] | None, direct: bool | None
) -> _Learned | None:
    """What *chain* (what the host presented) teaches: the anchors of the set that verify it."""
    why = "it presented no certificate"
    if chain:
        anchors = tuple(c.sha256 for c in anchors_for(chain, index))
        if anchors:
            logger.debug(
                "safepg: fast path learned %s: %d anchor(s) of the %d in %s verify its chain",
                key.where(),
                len(anchors),
                len(index.by_fingerprint),
                plan.trust,
            )
            learned = _Learned(anchors, direct)
            _write_entry(key, learned)
            return learned
        why = "no certificate in the trust set issued its chain"
    logger.debug(
        "safepg: fast path not used for %s (%s); verifying against the full set %s",
        key.where(),
        why,
        plan.trust,
    )
    _unlearnable[key] = time.monotonic() + _RETRY_AFTER
    return None


def _probe_host(
    plan: Plan, target: Target, key: _HostKey, index: _Index, timeout: float
) -> _Learned | None:
    """Learn *target* by a probe of its own (a TLS handshake that verifies nothing)."""
    from . import _probe  # ssl and socket, not at import time

    presented = _probe.presented_chain(
        target.hostaddr or target.host,
        int(target.port),
        server_hostname=target.host if key.sni else None,
        timeout=timeout,
        direct=key.direct,
    )
    if presented is None or presented.timed_out or not presented.tls:
        why = (
            "the probe could not reach it or complete a handshake"
            if presented is None
            else "it did not answer the probe in time"
            if presented.timed_out
            else "it does not offer TLS"
        )
        logger.debug("safepg: fast path not used for %s (%s)", key.where(), why)
        _unlearnable[key] = time.monotonic() + _RETRY_AFTER
        return None
    return _from_chain(plan, key, index, presented.chain, None)


# --- what a live session tells -----------------------------------------------------------------


class Session(Protocol):
    """A session libpq just verified, as its driver reports it (read on the caller's thread,
    while nothing else uses the connection)."""

    def where(self) -> tuple[str, str | None, str]:
        """The host (the name verified), the address (None: the driver does not say), the port."""
        ...

    def server_version(self) -> int:
        """The server's version number (170000 for PostgreSQL 17.0)."""
        ...

    def chain(self) -> Sequence[bytes] | None:
        """The chain libpq verified, as DER, or None where the driver cannot hand it over."""
        ...


class PsycopgSession:
    """`Session` for a psycopg 3 connection's pgconn: libpq's facts, read when asked."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn

    def where(self) -> tuple[str, str | None, str]:
        pgconn = self.pgconn
        return (
            (pgconn.host or b"").decode("utf-8", "replace"),
            (pgconn.hostaddr or b"").decode("utf-8", "replace"),
            (pgconn.port or b"").decode("utf-8", "replace"),
        )

    def server_version(self) -> int:
        return self.pgconn.server_version

    def chain(self) -> Sequence[bytes] | None:
        from . import _libpq

        return _libpq.presented_chain(self.pgconn)


def _landed(plan: Plan, session: Session) -> int | None:
    """Which of *plan*'s targets a live session went to; None if it cannot be told (a driver
    that does not report the address, and two targets with the same host and port)."""
    if len(plan.targets) == 1:
        return 0
    host, hostaddr, port = session.where()
    found = [
        i
        for i, t in enumerate(plan.targets)
        if t.host == host
        and t.port == port
        and (hostaddr is None or t.hostaddr in (None, "", hostaddr))
    ]
    return found[0] if len(found) == 1 or (found and hostaddr is not None) else None


def session_facts(plan: Plan, pgconn: pq.abc.PGconn) -> tuple[int | None, Sequence[bytes] | None]:
    """Which of *plan*'s targets a psycopg session went to, and the chain libpq verified."""
    session = PsycopgSession(pgconn)
    here = _landed(plan, session)
    return here, (session.chain() if here is not None else None)


def check_landing(plan: Plan, pgconn: pq.abc.PGconn) -> None:
    """`Route.verified`'s landing check, for a psycopg session of a narrowed *plan*."""
    _check_landing(plan, PsycopgSession(pgconn))


def _check_landing(plan: Plan, session: Session, libpq: int | None = None) -> None:
    """After a connect with the learned anchors of a multi-host *plan*: if libpq did not land
    on the first host, forget what was learned, so that the next connect tries every host
    with the full set. The first host may have failed only because its anchors changed
    (another root of the set), and libpq then went on to the next host without a word."""
    if len(plan.targets) > 1 and _landed(plan, session) != 0:
        logger.info(
            "safepg: %s answered instead of %s:%s with the learned anchors; the next connect "
            "uses the full trust set",
            session.where()[0],
            plan.targets[0].host,
            plan.targets[0].port,
        )
        forget(plan, libpq)


def learn_from_session(
    plan: Plan,
    here: int | None,
    chain: Sequence[bytes] | None,
    server_version: int,
    timeout: float = _DEFAULT_TIMEOUT,
    libpq: int | None = None,
) -> None:
    """Learn *plan*'s hosts from a session libpq just verified against the full set.

    *here* and *chain* come from the session: the chain libpq verified, read from the live
    session, with no network I/O and no second handshake. Whether the host takes direct TLS
    comes from its server version. A multi-host plan uses the full set until a verified
    session has been seen on each of its hosts. A single host whose session cannot be read
    (another TLS library, psycopg2) is probed in a background thread, off the caller's path.
    """
    found = _applicable(plan, libpq)
    if found is None:
        return
    index, keys = found
    now = time.monotonic()
    if any(_unlearnable.get(k, 0.0) > now for k in keys):
        return  # taught nothing a moment ago: the full set, without trying again yet
    direct = server_version >= _DIRECT_TLS_SERVER if auto_direct(plan, libpq) else None
    with _lock_for(keys):
        learned: list[_Learned | None] = [_read_entry(k, index) for k in keys]
        if here is not None and chain is not None:
            learned[here] = _from_chain(plan, keys[here], index, chain, direct)
            if learned[here] is not None and direct is not None:
                _log_direct(keys[here : here + 1], direct)
        missing = [i for i, item in enumerate(learned) if item is None]
        if not missing:
            _build(plan, keys, index, [item for item in learned if item is not None], libpq)
            return
    if len(keys) > 1:
        # Every host of a multi-host plan is learned from a session verified on it, never by
        # a probe: a probe reads an unauthenticated chain, and anchors that fail for one host
        # make libpq move on to the next one silently. The full set is used until then.
        return
    if chain is None:
        logger.debug("safepg: fast path: cannot read the session's chain here; probing instead")
        _probe_later(plan, index, keys, missing, timeout)


_probing: set[_HostKey] = set()


def _probe_later(
    plan: Plan, index: _Index, keys: tuple[_HostKey, ...], which: list[int], timeout: float
) -> None:
    now = time.monotonic()
    with _locks_guard:  # one probe per host at a time, whatever the threads
        todo = [
            i for i in which if keys[i] not in _probing and _unlearnable.get(keys[i], 0.0) <= now
        ]
        if not todo:
            return
        _probing.update(keys[i] for i in todo)

    def run() -> None:
        try:
            end = time.monotonic() + timeout
            for i in todo:
                left = end - time.monotonic()
                if left <= 0 or _probe_host(plan, plan.targets[i], keys[i], index, left) is None:
                    return
        finally:
            with _locks_guard:
                _probing.difference_update(keys[i] for i in todo)

    # A daemon: a process never waits at exit for a host that does not answer. One that exits
    # first has not learned that host; its next connect uses the full set, as now.
    threading.Thread(target=run, name="safepg-fast-path-probe", daemon=True).start()


def _after_fork() -> None:
    """A child of fork() has none of its parent's threads: a lock one of them held would stay
    held, and a probe it ran would never end. Start afresh (what was learned on disk stays)."""
    global _locks_guard, _check_lock
    _locks_guard = threading.Lock()
    _check_lock = threading.Lock()
    _locks.clear()
    _probing.clear()
    # A fresh start's records that the parent had not checked yet: its check thread is not
    # here. Forgotten in memory, so that the child's next connect reads the disk again (where
    # the parent's check may have dropped them) and checks what it uses itself.
    for path, keys, *_ in _unchecked:
        _memo.pop(keys, None)
        _known.pop(path, None)
    _unchecked.clear()
    _checking.clear()
    _pending.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _lock_for(keys: tuple[_HostKey, ...]) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(keys, threading.Lock())


def forget(plan: Plan, libpq: int | None = None) -> None:
    """Drop what was learned for *plan*'s hosts: libpq rejected the chain with the small file."""
    found = _applicable(plan, libpq)
    if found is None:
        return
    _drop(found[1])


def set_direct(plan: Plan, direct: bool, libpq: int | None = None) -> None:
    """Remember whether *plan*'s hosts take direct TLS: from the first connect's server version
    (PostgreSQL 17+), or False when a host refused it after all (a pooler put in front, an older
    server): then the SSLRequest is used from now on."""
    found = _applicable(plan, libpq)
    if found is None:
        return
    index, keys = found
    _memo.pop(keys, None)
    _remove(_plan_record_name(keys))  # names the old answer: made again by the next build
    _log_direct(keys, direct)
    for key in keys:
        item = _read_entry(key, index)
        if item is not None and item.direct is not direct:
            _write_entry(key, _Learned(item.anchors, direct))


def _log_direct(keys: Sequence[_HostKey], direct: bool) -> None:
    logger.debug(
        "safepg: learned that %s %s direct TLS%s",
        ", ".join(k.where() for k in keys),
        "takes" if direct else "does not take",
        " (PostgreSQL 17+): warm connects use it" if direct else ": the SSLRequest is used",
    )


# --- the route: one connect's attempts, and what each outcome teaches ----------------------------


def _libpq_failure(ex: BaseException, lost: type[Exception]) -> TypeGuard[Exception]:
    """*ex* is libpq's failure to connect (the driver's OperationalError), not safepg's own
    error from a password callable (``ConfigurationError`` is a psycopg OperationalError)."""
    return isinstance(ex, lost) and not isinstance(ex, SafePGError)


def _not_libpq(failed: tuple[Exception, Plan] | None) -> None:
    """An error that is not libpq's ends the connect (a password callable's, Ctrl-C): what an
    earlier attempt's error holds is dropped, and a fresh start's check is started all the
    same (`Route.verified` and `failed` will not run)."""
    _drop_secrets(failed)
    _start_pending()


def _drop_secrets(failed: tuple[Exception, Plan] | None) -> None:
    """An earlier attempt's failure, left behind when another error ends the connect: its
    frames and psycopg's snapshot of the failed connection hold that attempt's password."""
    if failed is None:
        return
    if getattr(failed[0], "_pgconn", None) is not None:
        failed[0]._pgconn = None  # type: ignore[attr-defined]
    _password.without_frames(failed[0])


def _last(failed: tuple[Exception, Plan] | None) -> tuple[Exception, Plan]:
    """The failure a route ended with: it ends only after one (the first attempt always runs)."""
    if failed is None:  # pragma: no cover - a route always has a first attempt
        raise RuntimeError("safepg: a connect ended without an attempt")
    return failed


class Route:
    """The attempts of one connect, in order, and every decision about them.

    The driver's loop (`safepg._connect`, `safepg.psycopg2`) iterates over the route, hands
    each attempt's parameters to libpq, and tells the route how it went: `failed` answers
    whether to go on to the next attempt, `verified` returns what to learn from the session.
    Which trust file, which negotiation, what to retry and what to learn are decided here:

    - warm: the anchors learned for the hosts (a subset of the full set), with direct TLS
      where it was learned and the driver's libpq knows it; the full set is the fallback;
    - a learned direct TLS refused in the handshake: remembered, and the SSLRequest retried;
    - the chain rejected with the learned anchors (a CA rotation within the set): forgotten,
      and the full set retried once;
    - the chain rejected with a CA fetched from the provider's API: fetched once more (a
      rotation) and tried once, never with anything wider;
    - nothing else is retried (authentication failures, refusals, timeouts).

    A further retry rule goes in `failed`: it may queue an attempt with `_then`.
    """

    def __init__(self, plan: Plan, use: bool, libpq: int) -> None:
        self.full = plan
        self.used = plan
        self._use = use
        self._libpq = libpq
        fast = cached(plan, libpq) if use else None
        self._attempts = [fast, plan] if fast else [plan]

    def __iter__(self) -> Iterator[Plan]:
        i = 0
        while i < len(self._attempts):
            self.used = self._attempts[i]
            yield self.used
            i += 1

    def drive(
        self,
        deadline: Deadline,
        attempt: Callable[[Mapping[str, str]], C],
        lost: type[Exception],
        fail: Callable[[Exception, Plan], BaseException],
        libpq_major: int | None = None,
    ) -> C:
        """Make the attempts with *attempt* (the driver's connect, given libpq's parameters)
        until one connects, and return its connection. Every attempt after the first gets
        what is left of *deadline* as its timeout. When the route says stop after a failure
        (an instance of *lost*, the driver's OperationalError), raise ``fail(error, plan)``,
        outside the except clause: the driver's error is then not its implicit context.

        Raises:
            ConfigurationError: from *attempt* (a password callable's): never retried, nor
                diagnosed. It, or any other error that is not libpq's, is raised as it is.
        """
        failed: tuple[Exception, Plan] | None = None
        for used in self:
            params = deadline.params_for(used.libpq_params(libpq_major), retry=failed is not None)
            if params is None:
                break  # a retry, with too little time left to start it
            try:
                return attempt(params)
            except BaseException as ex:
                if not _libpq_failure(ex, lost):
                    _not_libpq(failed)
                    raise
                failed = (ex, used)
            # Outside the except clause: an error while deciding (Ctrl-C while the set is
            # parsed) must not carry libpq's error, and its password, as its context.
            if not self._go_on(failed):
                break
        last = _last(failed)
        try:
            err = fail(*last)
        except BaseException:  # Ctrl-C during the diagnosis's probe
            _drop_secrets(failed)
            raise
        raise err

    async def drive_async(
        self,
        deadline: Deadline,
        attempt: Callable[[Mapping[str, str]], Awaitable[C]],
        lost: type[Exception],
        fail: Callable[[Exception, Plan], Awaitable[BaseException]],
    ) -> C:
        """`drive` for asyncio: *attempt* and *fail* are awaited."""
        failed: tuple[Exception, Plan] | None = None
        for used in self:
            params = deadline.params_for(used.libpq_params(), retry=failed is not None)
            if params is None:
                break
            try:
                return await attempt(params)
            except BaseException as ex:
                if not _libpq_failure(ex, lost):
                    _not_libpq(failed)
                    raise
                failed = (ex, used)
            if not self._go_on(failed):
                break
        last = _last(failed)
        try:
            err = await fail(*last)
        except BaseException:  # cancelled, or a timeout, during the diagnosis's probe
            _drop_secrets(failed)
            raise
        raise err

    def _go_on(self, failed: tuple[Exception, Plan]) -> bool:
        """`failed`, dropping what libpq's error holds if deciding raises."""
        try:
            return self.failed(failed[0])
        except BaseException:
            _drop_secrets(failed)
            raise

    def _then(self, attempt: Plan) -> None:
        """Queue *attempt* right after the current one."""
        self._attempts.insert(self._attempts.index(self.used) + 1, attempt)

    def failed(self, ex: Exception) -> bool:
        """Whether to go on after libpq's failure *ex* on the current attempt."""
        _start_pending()
        used, full = self.used, self.full
        where = ", ".join(f"{t.host}:{t.port}" for t in full.targets)
        if used.learned_direct and _diagnose.handshake_failed(ex):  # type: ignore[arg-type]
            logger.info("safepg: %s refused direct TLS; using the SSLRequest from now on", where)
            set_direct(full, False, self._libpq)
            params = {k: v for k, v in used.params.items() if k != "sslnegotiation"}
            self._then(replace(used, params=params, learned_direct=False))
            return True
        if not _diagnose.rejected_chain(ex):
            return False
        if self._rotate_fetched():
            return True
        if used is full or used.rotated:
            return False
        logger.info(
            "safepg: %s did not verify with the anchors learned for it; retrying once with %s",
            where,
            full.trust,
        )
        forget(full, self._libpq)
        return True  # the full set is the next attempt

    def _rotate_fetched(self) -> bool:
        """A CA fetched from a provider's API (see `_fetch.rotated_plan`) that no longer
        verifies: fetch it once more and try that, in place of what was left to try. Once per
        connect, and never anything wider: a second rejection stands."""
        if self.used.trust.origin != "fetched" or any(p.rotated for p in self._attempts):
            return False
        rotated = _fetch.rotated_plan(self.full)
        if rotated is None:
            return False
        forget(self.full, self._libpq)
        del self._attempts[self._attempts.index(self.used) + 1 :]
        self._attempts.append(replace(rotated, rotated=True))
        return True

    def verified(self, session: Session) -> Callable[[float], None] | None:
        """Take note of the session libpq verified on the current attempt. Cheap, on the
        caller's thread; returns the rest of the work (parsing the trust set, writing the
        cache: run it off an event loop, with the probe budget), or None when there is none."""
        _start_pending()
        used, full = self.used, self.full
        if used is not full:
            _check_landing(full, session, self._libpq)
        if self._use and used is full and may_learn(full, self._libpq):
            here = _landed(full, session)
            chain = session.chain() if here is not None else None
            version = session.server_version()
            libpq = self._libpq

            def learn(budget: float) -> None:
                learn_from_session(full, here, chain, version, budget, libpq)

            return learn
        if used.direct_unknown:
            direct = session.server_version() >= _DIRECT_TLS_SERVER
            libpq = self._libpq
            return lambda budget: set_direct(full, direct, libpq)
        return None


def route(plan: Plan, fast_path: object = None, *, libpq: int | None = None) -> Route:
    """The route for one connect of *plan*.

    Args:
        plan: the hardened plan (`_params.build_plan`).
        fast_path: the caller's ``fast_path`` argument (see `enabled`).
        libpq: the version of the driver's libpq (psycopg's when None).

    Raises:
        ConfigurationError: *fast_path* or ``SAFEPG_FAST_PATH`` is not a boolean.
    """
    return Route(plan, enabled(fast_path), pq.version() if libpq is None else libpq)


def clear_memory(*, keep_indexes: bool = False) -> None:
    """Forget everything learned in this process (the disk cache stays).

    With *keep_indexes*, the parsed trust sets stay: the state of a process that has not seen
    a host yet, but has connected elsewhere with the same trust set.
    """
    _memo.clear()
    _unlearnable.clear()
    _known.clear()
    _pending.clear()
    _unchecked.clear()
    if not keep_indexes:
        _indexes.clear()
