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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from psycopg import pq

from . import _cache, _x509
from ._environ import getenv
from ._errors import ConfigurationError
from ._params import Plan, Target, as_bool
from ._trust import TrustSource

logger = logging.getLogger("safepg")

ENV_SWITCH = "SAFEPG_FAST_PATH"
# A host that could not be probed is not probed again for this long (the full set is used).
_RETRY_AFTER = 60.0
# A probe never waits forever (the connect path passes its own budget, see _deadline).
_DEFAULT_TIMEOUT = 10.0
_ENTRY_VERSION = 1
# PostgreSQL 17 is the first server to accept TLS without the SSLRequest.
_DIRECT_TLS_SERVER = 170000


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


_indexes: dict[str, tuple[tuple[int, int, int], _Index]] = {}


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _index(path: str) -> _Index | None:
    key = _stat_key(path)
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


def _host_key(plan: Plan, target: Target, index: _Index) -> _HostKey:
    opts = plan.resolved
    return _HostKey(
        host=target.host,
        hostaddr=target.hostaddr or "",
        port=target.port,
        sni=opts.get("sslsni", "1") != "0",
        direct=opts.get("sslnegotiation") == "direct",
        trust_digest=index.digest,
    )


@dataclass(frozen=True)
class _Learned:
    anchors: tuple[str, ...]
    direct: bool | None = None  # takes direct TLS (PostgreSQL 17+); None: not known yet


def _read_entry(key: _HostKey, index: _Index) -> _Learned | None:
    """What was learned for *key*, from the disk cache, if the entry is sound."""
    directory = _cache.usable()
    if directory is None:
        return None
    try:
        entry = json.loads(_cache.read_private_file(directory / key.filename()))
        ok = (
            entry.get("version") == _ENTRY_VERSION
            and entry.get("host") == key.host
            and entry.get("hostaddr") == key.hostaddr
            and entry.get("port") == key.port
            and entry.get("trust_digest") == key.trust_digest
        )
        anchors = tuple(entry["anchors"]) if ok else ()
        direct = entry.get("direct_tls")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not anchors or not all(isinstance(a, str) and a in index.by_fingerprint for a in anchors):
        # Subset only: a fingerprint the full set lacks means the entry was tampered with, or
        # belongs to another set. Ignore it; the host is learned again.
        logger.debug("safepg: ignoring the learned anchors in %s", key.filename())
        return None
    return _Learned(anchors, direct if isinstance(direct, bool) else None)


def _write_entry(key: _HostKey, learned: _Learned) -> None:
    entry = {
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
    directory = _cache.usable()
    if directory is None:
        return
    try:
        _cache.write_private_file(directory / key.filename(), json.dumps(entry, indent=1).encode())
    except (OSError, ConfigurationError) as ex:
        logger.debug("safepg: cannot store what was learned for %s: %s", key.where(), ex)


# --- the small files, per plan -----------------------------------------------------------------

# host keys (holding the full set's digest) -> the trust to use, its stat key, and whether
# every host takes direct TLS (None: not known yet for one of them).
_memo: dict[tuple[_HostKey, ...], tuple[TrustSource, tuple[int, int, int], bool | None]] = {}
# host key -> when it may be probed again, after a probe that taught nothing.
_unlearnable: dict[_HostKey, float] = {}
_locks: dict[tuple[_HostKey, ...], threading.Lock] = {}
_locks_guard = threading.Lock()


def libpq_has_direct() -> bool:
    """This libpq knows sslnegotiation=direct (17+); older ones reject the keyword."""
    from psycopg import pq

    return pq.version() >= 170000


def auto_direct(plan: Plan) -> bool:
    """Learn and use direct TLS for *plan*: not chosen by the caller either way, libpq >= 17."""
    return plan.direct_tls is None and not plan.negotiation_chosen and libpq_has_direct()


def _applicable(plan: Plan) -> tuple[_Index, tuple[_HostKey, ...]] | None:
    if not plan.targets or any(t.socket for t in plan.targets):
        return None
    index = _index(plan.trust.path)
    if index is None:
        return None
    if len(index.by_fingerprint) <= 1 and not auto_direct(plan):
        return None  # nothing to gain: the set is as small as it gets, no direct TLS to learn
    return index, tuple(_host_key(plan, t, index) for t in plan.targets)


def _narrowed(plan: Plan, source: TrustSource, direct: bool | None) -> Plan:
    params = {**plan.params, "sslrootcert": source.path}
    auto = auto_direct(plan)
    if auto and direct:
        params["sslnegotiation"] = "direct"
    return replace(
        plan,
        params=params,
        trust=source,
        learned_direct=bool(auto and direct),
        direct_unknown=auto and direct is None,
    )


def _build(
    plan: Plan, keys: tuple[_HostKey, ...], index: _Index, learned: Sequence[_Learned]
) -> Plan | None:
    fingerprints = sorted({a for item in learned for a in item.anchors})
    flags = {item.direct for item in learned}
    direct = False if False in flags else (None if None in flags else True)
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
        where = ", ".join(k.where() for k in keys)
        source = TrustSource(
            str(path),
            f"{plan.trust.label}, narrowed to the {len(fingerprints)} anchor(s) that verify "
            f"{where}",
            plan.trust.origin,
        )
    stat_key = _stat_key(source.path)
    if stat_key is not None:
        _memo[keys] = (source, stat_key, direct)
    return _narrowed(plan, source, direct)


def _still_good(source: TrustSource, stat_key: tuple[int, int, int], full: TrustSource) -> bool:
    """The memoized trust file is as it was: a small file safepg wrote is checked with its
    directories (`_cache.unchanged`); the caller's own file by its stat key."""
    if source.path == full.path:
        return _stat_key(source.path) == stat_key
    return _cache.unchanged(source.path)


def cached(plan: Plan) -> Plan | None:
    """*plan* with what was learned for its hosts, if every one is learned; no network I/O."""
    found = _applicable(plan)
    if found is None:
        logger.debug("safepg: fast path not used: %s", _not_applicable(plan))
        return None
    index, keys = found
    memo = _memo.get(keys)
    if memo is not None:
        source, stat_key, direct = memo
        if _still_good(source, stat_key, plan.trust):
            logger.debug("safepg: fast path: warm (in memory), trusting %s", source)
            return _narrowed(plan, source, direct)
        # Changed on disk: rebuild it from the full set below. pop, not del: another thread
        # may have dropped the entry while this one was looking at the file.
        _memo.pop(keys, None)
    learned = []
    for key in keys:
        item = _read_entry(key, index)
        if item is None:
            return None
        learned.append(item)
    logger.debug("safepg: fast path: warm (disk cache) for %s", ", ".join(k.where() for k in keys))
    return _build(plan, keys, index, learned)


def _not_applicable(plan: Plan) -> str:
    if not plan.targets or any(t.socket for t in plan.targets):
        return "a Unix-domain socket host"
    return f"{plan.trust.path} holds one certificate (as small as it gets), or cannot be read"


def worth_learning(plan: Plan) -> bool:
    """Whether a connect with the full set should teach the fast path: it applies, and no host
    failed to teach lately."""
    found = _applicable(plan)
    if found is None:
        return False
    now = time.monotonic()
    return all(_unlearnable.get(k, 0.0) <= now for k in found[1])


def may_learn(plan: Plan) -> bool:
    """`worth_learning`, without parsing the trust set when it is not parsed yet (then
    `learn_from_session` decides, off an event loop)."""
    if not plan.targets or any(t.socket for t in plan.targets):
        return False
    return plan.trust.path not in _indexes or worth_learning(plan)


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


def _landed(plan: Plan, pgconn: pq.abc.PGconn) -> int | None:
    """Which of *plan*'s targets a live session went to (libpq reports host, address, port)."""
    if len(plan.targets) == 1:
        return 0
    host = (pgconn.host or b"").decode("utf-8", "replace")
    hostaddr = (pgconn.hostaddr or b"").decode("utf-8", "replace")
    port = (pgconn.port or b"").decode("utf-8", "replace")
    return next(
        (
            i
            for i, t in enumerate(plan.targets)
            if t.host == host and t.port == port and t.hostaddr in (None, "", hostaddr)
        ),
        None,
    )


def session_facts(plan: Plan, pgconn: pq.abc.PGconn) -> tuple[int | None, list[bytes] | None]:
    """Which of *plan*'s targets a live session went to, and the chain libpq verified (see
    `_libpq.presented_chain`; None where it cannot be read). Cheap, and on the caller's
    thread: the connection must not be in use elsewhere."""
    from . import _libpq

    here = _landed(plan, pgconn)
    return here, (_libpq.presented_chain(pgconn) if here is not None else None)


def check_landing(plan: Plan, pgconn: pq.abc.PGconn) -> None:
    """After a connect with the learned anchors of a multi-host *plan*: if libpq did not land
    on the first host, forget what was learned, so that the next connect tries every host
    with the full set. The first host may have failed only because its anchors changed
    (another root of the set), and libpq then went on to the next host without a word."""
    if len(plan.targets) > 1 and _landed(plan, pgconn) != 0:
        logger.info(
            "safepg: %s answered instead of %s:%s with the learned anchors; the next connect "
            "uses the full trust set",
            (pgconn.host or b"").decode("utf-8", "replace"),
            plan.targets[0].host,
            plan.targets[0].port,
        )
        forget(plan)


def learn_from_session(
    plan: Plan,
    here: int | None,
    chain: Sequence[bytes] | None,
    server_version: int,
    timeout: float = _DEFAULT_TIMEOUT,
) -> None:
    """Learn *plan*'s hosts from a session libpq just verified against the full set.

    *here* and *chain* come from `session_facts`: the chain libpq verified, read from the live
    session, with no network I/O and no second handshake. Whether the host takes direct TLS
    comes from its server version. A multi-host plan uses the full set until a verified
    session has been seen on each of its hosts. A single host whose session cannot be read
    (another TLS library) is probed in a background thread, off the caller's path.
    """
    found = _applicable(plan)
    if found is None:
        return
    index, keys = found
    now = time.monotonic()
    if any(_unlearnable.get(k, 0.0) > now for k in keys):
        return  # taught nothing a moment ago: the full set, without trying again yet
    direct = server_version >= _DIRECT_TLS_SERVER if auto_direct(plan) else None
    with _lock_for(keys):
        learned: list[_Learned | None] = [_read_entry(k, index) for k in keys]
        if here is not None and chain is not None:
            learned[here] = _from_chain(plan, keys[here], index, chain, direct)
            if learned[here] is not None and direct is not None:
                _log_direct(keys[here : here + 1], direct)
        missing = [i for i, item in enumerate(learned) if item is None]
        if not missing:
            _build(plan, keys, index, [item for item in learned if item is not None])
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
    global _locks_guard
    _locks_guard = threading.Lock()
    _locks.clear()
    _probing.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _lock_for(keys: tuple[_HostKey, ...]) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(keys, threading.Lock())


def forget(plan: Plan) -> None:
    """Drop what was learned for *plan*'s hosts: libpq rejected the chain with the small file."""
    found = _applicable(plan)
    if found is None:
        return
    keys = found[1]
    _memo.pop(keys, None)
    directory = _cache.usable()
    if directory is None:
        return
    for key in keys:
        with contextlib.suppress(OSError):
            (directory / key.filename()).unlink(missing_ok=True)


def set_direct(plan: Plan, direct: bool) -> None:
    """Remember whether *plan*'s hosts take direct TLS: from the first connect's server version
    (PostgreSQL 17+), or False when a host refused it after all (a pooler put in front, an older
    server): then the SSLRequest is used from now on."""
    found = _applicable(plan)
    if found is None:
        return
    index, keys = found
    _memo.pop(keys, None)
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


def clear_memory(*, keep_indexes: bool = False) -> None:
    """Forget everything learned in this process (the disk cache stays).

    With *keep_indexes*, the parsed trust sets stay: the state of a process that has not seen
    a host yet, but has connected elsewhere with the same trust set.
    """
    _memo.clear()
    _unlearnable.clear()
    if not keep_indexes:
        _indexes.clear()
