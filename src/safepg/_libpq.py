"""Reading what psycopg does not expose of libpq's TLS session: ``PQsslAttribute``, and the
certificate chain the server presented, through ``PQsslStruct(conn, "OpenSSL")``.

The functions are taken from the very libpq psycopg loaded: psycopg's ctypes handle for the
``python`` implementation, and the copy shipped inside the psycopg-binary wheel for ``binary``.
If that copy cannot be found unambiguously, or its version differs from psycopg's, nothing is
called and the attributes are reported as unknown. OpenSSL's functions are looked up through
the same handle, so they come from the libssl that this libpq is linked with, the one that made
the session; with another TLS library, nothing is read.
"""

from __future__ import annotations

import ctypes
import functools
import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import pq

_SslAttribute = Callable[[int, bytes], "bytes | None"]


def _binary_libpq() -> ctypes.CDLL | None:
    try:
        import psycopg_binary  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    base = Path(psycopg_binary.__file__).parent
    # auditwheel / delvewheel put vendored libraries beside the package; delocate inside it.
    found = glob.glob(str(base.parent / "psycopg_binary.libs" / "libpq*")) + glob.glob(
        str(base / ".dylibs" / "libpq*")
    )
    if len(found) != 1:
        return None
    return ctypes.CDLL(found[0])


@functools.lru_cache(maxsize=1)
def _libpq() -> ctypes.CDLL | None:
    """psycopg's own libpq, or None when it cannot be told apart."""
    lib: ctypes.CDLL | None
    try:
        if pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            lib = getattr(_pq_ctypes, "pq", None)
        elif pq.__impl__ == "binary":
            lib = _binary_libpq()
        else:
            return None
        if lib is None:
            return None
        lib.PQlibVersion.restype = ctypes.c_int
        return lib if lib.PQlibVersion() == pq.version() else None
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def _ssl_attribute_fn() -> _SslAttribute | None:
    lib = _libpq()
    try:
        fn = lib.PQsslAttribute if lib is not None else None
    except AttributeError:
        return None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    fn.restype = ctypes.c_char_p

    def call(ptr: int, name: bytes) -> bytes | None:
        value: bytes | None = fn(ptr, name)
        return value

    return call


def ssl_attribute(pgconn: pq.abc.PGconn, name: str) -> str | None:
    """``PQsslAttribute(conn, name)`` ("protocol", "cipher", "key_bits", "library"), or None."""
    fn = _ssl_attribute_fn()
    if fn is None or pgconn.status != pq.ConnStatus.OK:
        return None
    ptr = getattr(pgconn, "pgconn_ptr", None)
    if not ptr:
        return None
    value = fn(ptr, name.encode())
    return value.decode("ascii", "replace") if value else None


@dataclass(frozen=True)
class _ChainFns:
    ssl_struct: Any  # PQsslStruct(PGconn *, const char *) -> SSL *
    peer_chain: Any  # SSL_get0_verified_chain(const SSL *) -> STACK_OF(X509) *
    count: Any  # OPENSSL_sk_num(const OPENSSL_STACK *) -> int
    value: Any  # OPENSSL_sk_value(const OPENSSL_STACK *, int) -> void *
    i2d: Any  # i2d_X509(const X509 *, unsigned char **) -> int


@functools.lru_cache(maxsize=1)
def _chain_fns() -> _ChainFns | None:
    lib = _libpq()
    if lib is None:
        return None
    try:
        # Through libpq's handle, dlsym searches libpq and then the libraries it was linked
        # with: the libssl and libcrypto it was built against (OpenSSL 1.1+).
        # lib[name]: a function object of our own, so psycopg's own (lib.name) keep their types.
        fns = _ChainFns(
            lib["PQsslStruct"], lib["SSL_get0_verified_chain"], lib["OPENSSL_sk_num"],
            lib["OPENSSL_sk_value"], lib["i2d_X509"],
        )  # fmt: skip
    except AttributeError:
        return None
    if not _same_as_global(fns):
        return None
    fns.ssl_struct.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    fns.ssl_struct.restype = ctypes.c_void_p
    fns.peer_chain.argtypes = [ctypes.c_void_p]
    fns.peer_chain.restype = ctypes.c_void_p
    fns.count.argtypes = [ctypes.c_void_p]
    fns.count.restype = ctypes.c_int
    fns.value.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fns.value.restype = ctypes.c_void_p
    fns.i2d.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    fns.i2d.restype = ctypes.c_int
    return fns


def _same_as_global(fns: _ChainFns) -> bool:
    """Whether the process's global scope resolves OpenSSL's functions to the same code.

    libpq's own calls into OpenSSL bind to the first definition in the global scope when one is
    there (LD_PRELOAD, a library loaded with RTLD_GLOBAL, an embedding server): then its
    sessions are another OpenSSL's objects, which the one found through its handle must not
    read. Nothing is read unless both lookups agree (or the global scope has none).
    """
    try:
        everywhere = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - a platform without a global scope handle
        return False
    for name, ours in (("SSL_get0_verified_chain", fns.peer_chain), ("i2d_X509", fns.i2d)):
        try:
            theirs = everywhere[name]
        except AttributeError:
            continue  # no OpenSSL in the global scope: libpq binds to its own
        if ctypes.cast(theirs, ctypes.c_void_p).value != ctypes.cast(ours, ctypes.c_void_p).value:
            return False
    return True


# A chain longer than this is not a server's (a leaf and a few intermediates).
_MAX_CHAIN = 16
_MAX_CERT = 64 * 1024


def presented_chain(pgconn: pq.abc.PGconn) -> list[bytes] | None:
    """The chain libpq verified in this live session, leaf first, to the trust anchor, as DER.

    Read from libpq's OpenSSL object of the session (``SSL_get0_verified_chain``): the path
    OpenSSL built and checked, not extra certificates the server may have sent, with no
    second handshake. None when that cannot be done here (another TLS library, a libpq that
    cannot be found, no TLS in use); the caller then has nothing to learn from the session.
    Must be called on the thread that owns the connection, while nothing else uses it.
    """
    fns = _chain_fns()
    ptr = getattr(pgconn, "pgconn_ptr", None)
    if fns is None or not ptr or pgconn.status != pq.ConnStatus.OK:
        return None
    if ssl_attribute(pgconn, "library") != "OpenSSL":
        return None
    ssl = fns.ssl_struct(ptr, b"OpenSSL")
    stack = fns.peer_chain(ssl) if ssl else None
    if not stack:
        return None
    count = fns.count(stack)
    if not 0 < count <= _MAX_CHAIN:
        return None
    chain = []
    for i in range(count):
        x509 = fns.value(stack, i)
        size = fns.i2d(x509, None) if x509 else 0
        if not 0 < size <= _MAX_CERT:
            return None
        buf = ctypes.create_string_buffer(size)
        out = ctypes.c_void_p(ctypes.addressof(buf))
        if fns.i2d(x509, ctypes.byref(out)) != size:
            return None
        chain.append(buf.raw)
    return chain
