"""Reading libpq's TLS attributes (``PQsslAttribute``), which psycopg does not expose.

The function is taken from the very libpq psycopg loaded: psycopg's ctypes handle for the
``python`` implementation, and the copy shipped inside the psycopg-binary wheel for ``binary``.
If that copy cannot be found unambiguously, or its version differs from psycopg's, nothing is
called and the attributes are reported as unknown.
"""

from __future__ import annotations

import ctypes
import functools
import glob
from collections.abc import Callable
from pathlib import Path

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
def _ssl_attribute_fn() -> _SslAttribute | None:
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
        if lib.PQlibVersion() != pq.version():
            return None
        fn = lib.PQsslAttribute
    except (OSError, AttributeError):
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
