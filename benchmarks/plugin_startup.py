"""What the pytest plugin costs a pytest run that never uses it.

pytest loads every ``pytest11`` plugin of the environment in every run, so safepg's plugin is
loaded for suites that use no safepg fixture. This times ``pytest --collect-only`` of a
one-test file in a fresh process, N interleaved rounds with the plugin and with
``-p no:safepg``, and prints the medians and their difference (goal: at most 50 ms)::

    .venv/bin/python benchmarks/plugin_startup.py [-n 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_MS = 50.0


# As users run pytest: bytecode written, so that pytest's assertion rewriting of plugin modules is
# cached after the first run (PYTHONDONTWRITEBYTECODE makes pytest rewrite every plugin module,
# safepg's included, in every run: about 30 ms more for safepg's on a busy 2-core machine).
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _run(directory: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *extra],
        cwd=directory,
        check=True,
        stdout=subprocess.DEVNULL,
        env=_ENV,
    )
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="rounds (default 30)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
        _run(directory, [])  # warm the file system cache and the bytecode
        _run(directory, ["-p", "no:safepg"])
        with_plugin: list[float] = []
        without: list[float] = []
        for _ in range(args.n):  # interleaved: a busy machine slows both alike
            with_plugin.append(_run(directory, []))
            without.append(_run(directory, ["-p", "no:safepg"]))
    a, b = statistics.median(with_plugin), statistics.median(without)
    # Each round's difference: a run and its neighbour see about the same load.
    cost = statistics.median(x - y for x, y in zip(with_plugin, without, strict=True))
    imported = _import_cost()
    print(f"pytest --collect-only, median of {args.n} runs each:")
    print(f"  with the safepg plugin   {a:7.1f} ms")
    print(f"  with -p no:safepg        {b:7.1f} ms")
    print(f"  the plugin costs         {cost:7.1f} ms, median of the rounds' differences")
    print(f"                                      (goal: <= {GOAL_MS:g} ms)")
    print(f"  importing the plugin     {imported:7.1f} ms, pytest already imported (best of 5)")
    return 0 if cost <= GOAL_MS else 1


def _import_cost() -> float:
    code = (
        "import time, pytest; t = time.perf_counter(); import safepg.pytest_plugin; "
        "print((time.perf_counter() - t) * 1000)"
    )
    runs = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=_ENV).stdout)
        for _ in range(5)
    ]  # fmt: skip
    return min(runs)


if __name__ == "__main__":
    sys.exit(main())
