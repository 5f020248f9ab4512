"""``safepg demo --keep`` as a real process: signals at every stage leave nothing behind (no
server, no files), and as root the files it tells you to use are yours, not the server's."""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from safepg._cli import main

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="finds leftover processes through /proc"
)

# How long one demo may take to reach a stage or to exit: generous, the machine is shared.
_PATIENCE = 120.0


def _processes_under(path: Path) -> list[int]:
    """Live processes that name *path* in their command line or environment: everything the
    demo started (postgres, initdb and initdb's own postgres), since each inherits its TMPDIR."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            named = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and os.fsencode(path) in named:
            found.append(int(proc.name))
    return found


class Demo:
    """``python -m safepg demo --keep`` with its own TMPDIR; its output, line by line."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["TMPDIR"] = str(tmp)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safepg", "demo", "--keep"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            self.lines.put(line)
        self.lines.put("")  # the end

    def until_line(self, text: str) -> str:
        """Read output up to the first line holding *text*; returns that line."""
        while True:
            line = self.lines.get(timeout=_PATIENCE)
            assert line, f"the demo ended before printing {text!r}:\n{self.output()}"
            self.seen.append(line)
            if text in line:
                return line

    def until(self, done: Callable[[], bool]) -> None:
        """Poll until *done()*, failing if the demo exits first."""
        deadline = time.monotonic() + _PATIENCE
        while not done():
            assert self.proc.poll() is None, f"the demo exited early:\n{self.output()}"
            assert time.monotonic() < deadline, "the demo did not get there"
            time.sleep(0.005)

    def fields(self) -> dict[str, str]:
        """The aligned ``name  value`` lines printed for --keep, once it waits."""
        self.until_line("inspect it")  # the last line it prints before it waits
        shown = {}
        for line in self.seen:
            key, _, value = line.strip().partition("  ")
            shown[key] = value.strip()
        return shown

    def finish(self) -> int:
        code = self.proc.wait(timeout=_PATIENCE)
        self.reader.join(timeout=_PATIENCE)
        if self.proc.stdout:
            self.proc.stdout.close()
        return code

    def output(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            self.seen.append(line)
        return "".join(self.seen)

    def assert_nothing_left(self) -> None:
        """No process runs from the demo's directories, and none of its files remain."""
        assert _processes_under(self.tmp) == [], self.output()
        assert sorted(p.name for p in self.tmp.iterdir()) == [], self.output()


@pytest.fixture
def demo() -> Iterator[Demo]:
    """A demo in a TMPDIR of its own, so the test sees exactly what it made. Sticky and open
    like /tmp: as root, the server's own account must reach its directory in there."""
    tmp = Path(tempfile.mkdtemp(prefix="safepg-demo-test-"))
    tmp.chmod(0o1777)
    running = Demo(tmp)
    yield running
    # What a failing run left, all started by this test: the demo itself, then the processes
    # found by their unique directory. SIGQUIT is PostgreSQL's immediate shutdown, and also
    # ends initdb.
    if running.proc.poll() is None:
        running.proc.kill()
    running.finish()
    for pid in _processes_under(tmp):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + _PATIENCE
    while _processes_under(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(tmp, ignore_errors=True)


def _server_dirs(tmp: Path, name: str) -> bool:
    return any(tmp.glob(f"safepg-pg-*/{name}"))


# The stage to signal at, and how to know it has come.
STAGES: dict[str, Callable[[Demo], object]] = {
    # initdb is running: it has made the data directory.
    "initdb": lambda demo: demo.until(lambda: _server_dirs(demo.tmp, "data/PG_VERSION")),
    # initdb's own postgres is making the first database.
    "bootstrap": lambda demo: demo.until(lambda: _server_dirs(demo.tmp, "data/base/1")),
    # postgres has started but may not take connections yet.
    "postmaster": lambda demo: demo.until(lambda: _server_dirs(demo.tmp, "data/postmaster.pid")),
    # it is waiting for Ctrl-C, having printed how to reach the server.
    "waiting": lambda demo: demo.fields(),
}
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("stage", list(STAGES))
def test_signal_stops_server_and_removes_files(demo: Demo, stage: str, signum: int) -> None:
    """SIGTERM or SIGHUP (a closed terminal) end it as Ctrl-C does, at any stage: the server
    stops and its directory, the CA and the password file are removed. Waiting, that is how it
    is meant to end (exit 0); earlier, the demo was interrupted (128 + the signal number)."""
    STAGES[stage](demo)
    demo.proc.send_signal(signum)
    code = demo.finish()
    demo.assert_nothing_left()
    out = demo.output()
    waiting = "The server keeps running" in out
    assert code == (0 if waiting else 128 + signum), out
    assert "Server stopped" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("stage", ["postmaster", "waiting"])
def test_signals_during_cleanup_do_not_cut_it_short(demo: Demo, stage: str) -> None:
    """Pressing Ctrl-C again, or the terminal closing, while it stops the server does not
    leave the server or its files behind."""
    STAGES[stage](demo)
    demo.proc.send_signal(signal.SIGTERM)
    demo.until_line("topping the server")  # it has begun to clean up ("Stopping", "stopping")
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        demo.proc.send_signal(signum)
    code = demo.finish()
    demo.assert_nothing_left()
    out = demo.output()
    assert code == (0 if "The server keeps running" in out else 128 + signal.SIGTERM), out
    assert "Traceback" not in out, out


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another account only as root")
def test_client_files_belong_to_the_caller_as_root(demo: Demo) -> None:
    """As root the server runs as an unprivileged account, which owns the server's directory.
    The CA file the printed check line trusts and the password file live elsewhere: in a 0700
    directory of the caller's, so that account can neither swap the CA nor read the password."""
    shown = demo.fields()
    try:
        ca = Path(shown["CA file"])
        passfile = Path(shown["password file"].split(" (", 1)[0])
        client = ca.parent
        (server_dir,) = demo.tmp.glob("safepg-pg-*")
        server_owner = server_dir.stat().st_uid
        assert server_owner != os.geteuid()  # the premise: the server is not ours
        assert passfile.parent == client
        assert client.parent == demo.tmp  # not inside the server's directory
        info = client.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o700)
        info = ca.stat()
        assert info.st_uid == os.geteuid()
        assert stat.S_IMODE(info.st_mode) & 0o022 == 0
        info = passfile.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o600)
        # The URL and both ready lines name these files, and the demo's own connects use them.
        assert f"sslrootcert={ca}" in shown["url"]
        assert f"passfile={passfile}" in shown["url"]
        assert shlex.quote(str(ca)) in shown["inspect it"]
        assert f"sslrootcert={ca} " in demo.output()
        assert str(server_dir) not in demo.output().replace(f"{server_dir}/sock", "")
    finally:
        demo.proc.send_signal(signal.SIGINT)
        code = demo.finish()
    demo.assert_nothing_left()
    assert code == 0, demo.output()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_stops_when_the_demo_is_killed(demo: Demo) -> None:
    """SIGKILL leaves no time to clean up, but Linux tells the server its parent died: it
    shuts down rather than run on, orphaned. (Its files stay: nobody is left to remove them.)"""
    demo.fields()
    assert _processes_under(demo.tmp)  # the server
    demo.proc.kill()
    demo.finish()
    deadline = time.monotonic() + _PATIENCE
    while _processes_under(demo.tmp) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _processes_under(demo.tmp) == []


def test_socket_refusal_names_the_command_line_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Step 3 shows the library's refusal, which names connect's keyword; the demo also says
    what a command-line user types instead."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "allow_unencrypted_unix_socket=True" in out
    assert "safepg check takes --allow-unencrypted-unix-socket." in out
