"""The mutation stage: do the tests fail when a security decision is removed or inverted?

Runs cosmic-ray over the modules listed in mutation/config.toml, each against only the test
files listed for it (with ``-x``, real servers, a timeout per mutant), in a scratch copy of the
tree: the working tree is never mutated, so an interrupted run leaves nothing behind.

Each target's outcome goes to mutation/results/<module>.json (with the command, the date and
the commit); mutation/RESULTS.md is then rebuilt from every results file and from
mutation/equivalent.toml, the mutants that cannot change behaviour and why.

    python scripts/mutate.py                 every target (slow: hours on two cores)
    python scripts/mutate.py _cache _redact  the targets whose module path contains a word
    python scripts/mutate.py --report        only rebuild RESULTS.md from the results files
    python scripts/mutate.py --list          the targets and how many mutants each has

Needs Python 3.11+ (tomllib) and the dev extra (cosmic-ray).
Exit status: 0 when every mutant was killed or is listed as equivalent, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mutation" / "config.toml"
EQUIVALENT = ROOT / "mutation" / "equivalent.toml"
RESULTS_DIR = ROOT / "mutation" / "results"
REPORT = ROOT / "mutation" / "RESULTS.md"


def log(message: str) -> None:
    print(f"scripts/mutate: {message}", file=sys.stderr, flush=True)


def mutant_id(module: str, function: str | None, operator: str, diff: str) -> str:
    """A name for a mutant that survives unrelated edits: its module, function, operator and
    changed lines (without line numbers)."""
    changed = [
        line[0] + line[1:].strip()
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    text = "\n".join([module, str(function), operator, *changed])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(module: str) -> str:
    return module.removeprefix("src/").removesuffix(".py").replace("/", ".")


def scratch_copy(into: Path) -> None:
    """The tree as it is now (tracked and untracked, not ignored files), without bytecode."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in names:
        if not raw:
            continue
        name = raw.decode()
        src = ROOT / name
        if not src.is_file() or name.startswith("mutation/results/"):
            continue
        dest = into / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _annotation_spans(module: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations are: with ``from __future__ import annotations`` they are
    never evaluated, so a mutant there (``str | None`` made ``str & None``) changes nothing."""
    import ast

    spans = []
    for node in ast.walk(ast.parse(module.read_text())):
        found: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node.returns)
        elif isinstance(node, (ast.arg, ast.AnnAssign)):
            found.append(node.annotation)
        for ann in found:
            if ann is not None and ann.end_lineno is not None and ann.end_col_offset is not None:
                spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans


def work_items(module: Path, operators: list[str], functions: list[str] | None) -> list[Any]:
    """The mutants of *module* in scope: the operators, the functions, not in annotations."""
    from cosmic_ray.commands.init import _all_work_items  # type: ignore[import-untyped]

    annotations = _annotation_spans(module)
    return [
        item
        for item in _all_work_items([module], {})
        if item.mutations[0].operator_name in operators
        and (functions is None or item.mutations[0].definition_name in functions)
        and not any(start <= tuple(item.mutations[0].start_pos) < end for start, end in annotations)
    ]


def run_target(
    target: dict[str, Any],
    operators: list[str],
    timeout: float,
    scratch: Path,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run *target*'s mutants; with *previous* (its last results, same module source), only
    the ones that were not killed then, merged into those results."""
    from cosmic_ray.work_db import WorkDB, use_db  # type: ignore[import-untyped]
    from cosmic_ray.work_item import WorkerOutcome, WorkResult  # type: ignore[import-untyped]

    module = target["module"]
    functions = target.get("functions")
    tests = " ".join(target["tests"])
    name = slug(module)
    test_command = (
        f"{sys.executable} -m pytest -x -q -p no:cacheprovider --no-header "
        f"-o console_output_style=classic {tests}"
    )
    if target.get("libpq15"):
        # Also with the system's libpq (PSYCOPG_IMPL=python): some decisions guard against
        # what only an older libpq does (libpq 15 does not report a service among the
        # options), and are no-ops with psycopg-binary's libpq 18.
        test_command = "sh -c " + shlex.quote(
            f"{test_command} && PSYCOPG_IMPL=python {test_command}"
        )
    config = scratch / f".mutation-{name}.toml"
    session = scratch / f".mutation-{name}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module)}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(test_command)}\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([*cosmic_ray, "init", str(config), str(session)], cwd=scratch, check=True)
    wanted = {
        (item.mutations[0].operator_name, item.mutations[0].occurrence)
        for item in work_items(scratch / module, operators, functions)
    }
    if previous is not None:
        # Not killed last time, and not judged equivalent since (the module is unchanged:
        # running those again cannot change their outcome).
        equivalent = load_equivalent()
        wanted &= {
            (m["operator"], m["occurrence"])
            for m in previous["mutants"]
            if m["outcome"] not in ("killed", "timeout")
            and mutant_id(module, m["function"], m["operator"], m["diff"]) not in equivalent
        }
    with use_db(session, WorkDB.Mode.open) as db:
        for item in db.work_items:
            spec = item.mutations[0]
            if (spec.operator_name, spec.occurrence) not in wanted:
                db.set_result(
                    item.job_id,
                    WorkResult(output="not in scope", worker_outcome=WorkerOutcome.SKIPPED),
                )
    log(f"{module}: {len(wanted)} mutants, tests: {tests}")
    started = dt.datetime.now(dt.UTC)
    baseline = subprocess.run(
        [*cosmic_ray, "baseline", str(config)], cwd=scratch, env=env, check=False
    )
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: the tests fail without any mutant; fix that first")
    subprocess.run(
        [*cosmic_ray, "exec", str(config), str(session)], cwd=scratch, env=env, check=True
    )
    mutants = []
    with use_db(session, WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            spec = item.mutations[0]
            diff = result.diff or ""
            if result.worker_outcome == WorkerOutcome.NORMAL:
                outcome = str(result.test_outcome.value)  # killed, survived, incompetent
            else:
                outcome = str(result.worker_outcome.value)  # timeout, exception, abnormal
            mutants.append(
                {
                    "id": mutant_id(module, spec.definition_name, spec.operator_name, diff),
                    "operator": spec.operator_name,
                    "occurrence": spec.occurrence,
                    "function": spec.definition_name,
                    "line": spec.start_pos[0],
                    "outcome": outcome,
                    "diff": diff if outcome != "killed" else "",
                }
            )
    if previous is not None:
        again = {(m["operator"], m["occurrence"]) for m in mutants}
        mutants += [m for m in previous["mutants"] if (m["operator"], m["occurrence"]) not in again]
    mutants.sort(key=lambda m: (m["line"], m["operator"], m["occurrence"]))
    return {
        # The copy the mutants were made from: the tree may change while a target runs.
        "source_sha256": hashlib.sha256((scratch / module).read_bytes()).hexdigest(),
        "retried": [
            *(previous.get("retried", []) if previous else []),
            *([f"{started:%Y-%m-%d %H:%M UTC}: {len(wanted)}"] if previous else []),
        ],
        "module": module,
        "functions": functions,
        "tests": target["tests"],
        "test_command": test_command.replace(sys.executable, "python"),
        "started": previous["started"] if previous else f"{started:%Y-%m-%d %H:%M UTC}",
        "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds())
        + (previous["seconds"] if previous else 0),
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "mutants": mutants,
    }


def load_equivalent() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text())
    return {entry["id"]: entry["reason"] for entry in data.get("mutant", [])}


def report(config: dict[str, Any]) -> int:
    """Rebuild RESULTS.md; 1 if any mutant survives that is not listed as equivalent."""
    equivalent = load_equivalent()
    rows, survivors, explained = [], [], []
    totals = {"mutants": 0, "killed": 0, "equivalent": 0, "survived": 0}
    not_run: list[str] = []
    changed: list[str] = []  # the module is no longer the one its mutants were made from
    for target in config["target"]:
        path = RESULTS_DIR / f"{slug(target['module'])}.json"
        if not path.exists():
            not_run.append(target["module"])
            continue
        data = json.loads(path.read_text())
        source = hashlib.sha256((ROOT / target["module"]).read_bytes()).hexdigest()
        if data.get("source_sha256") != source:
            changed.append(target["module"])
        counts = {"killed": 0, "timeout": 0, "equivalent": 0, "survived": 0, "other": 0}
        for m in data["mutants"]:
            m["id"] = mutant_id(data["module"], m["function"], m["operator"], m["diff"])
            if m["outcome"] == "killed":
                counts["killed"] += 1
            elif m["outcome"] == "timeout":
                counts["timeout"] += 1  # a hang is a change of behaviour: killed
            elif m["id"] in equivalent:
                counts["equivalent"] += 1
                explained.append((data["module"], m, equivalent[m["id"]]))
            elif m["outcome"] == "survived":
                counts["survived"] += 1
                survivors.append((data["module"], m))
            else:  # incompetent (the mutant does not even import) or a worker error
                counts["other"] += 1
        total = len(data["mutants"])
        scope = ", ".join(data["functions"]) if data["functions"] else "all functions"
        rows.append(
            f"| `{data['module']}` | {scope} | {total} | {counts['killed'] + counts['timeout']} "
            f"| {counts['equivalent']} | {counts['survived']} | {counts['other']} "
            f"| {data['started']}, {data['seconds']} s, {data['commit']} |"
        )
        totals["mutants"] += total - counts["other"]
        totals["killed"] += counts["killed"] + counts["timeout"]
        totals["equivalent"] += counts["equivalent"]
        totals["survived"] += counts["survived"]
    judged = totals["mutants"] - totals["equivalent"]
    score = 100.0 * totals["killed"] / judged if judged else 0.0
    lines = [
        "# Mutation testing results",
        "",
        "Generated by `scripts/dev mutate` (scripts/mutate.py, cosmic-ray) from",
        "mutation/results/*.json and mutation/equivalent.toml; do not edit by hand.",
        "",
        f"**Score: {totals['killed']} of {judged} non-equivalent mutants killed ({score:.1f} %)**;"
        f" {totals['equivalent']} equivalent mutants listed below with the reason;"
        f" {totals['survived']} surviving.",
        "",
        "Killed includes timeouts (a mutant that makes a test hang changes behaviour). Other:",
        "mutants that do not import (cosmic-ray's `incompetent`), not counted in the score.",
        "",
        "| Module | Scope | Mutants | Killed | Equivalent | Survived | Other | Run |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if not_run:
        lines += [
            "## Not run yet",
            "",
            "These targets of mutation/config.toml have no results: their mutants were not tried.",
            "",
            *(f"- `{m}`" for m in not_run),
            "",
        ]
    if changed:
        lines += [
            "## Changed since their run",
            "",
            "These modules changed after their row was made: run them again (the row may no",
            "longer hold).",
            "",
            *(f"- `{m}`" for m in changed),
            "",
        ]
    lines += ["## Surviving mutants", ""]
    if not survivors:
        lines += ["None.", ""]
    for module, m in survivors:
        lines += [
            f"### `{m['id']}`: {module}:{m['line']} in `{m['function']}` ({m['operator']})",
            "",
            "```diff",
            *_hunk(m["diff"]),
            "```",
            "",
        ]
    lines += ["## Equivalent mutants", ""]
    if not explained:
        lines += ["None.", ""]
    for module, m, reason in explained:
        lines += [
            f"- `{m['id']}` {module}:{m['line']} in `{m['function']}` ({m['operator']}): {reason}"
        ]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    log(f"wrote {REPORT.relative_to(ROOT)}: score {score:.1f} %, {totals['survived']} surviving")
    return 1 if totals["survived"] or not_run or changed else 0


def _hunk(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if not line.startswith(("+++", "---"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="run the targets whose module contains these")
    parser.add_argument("--report", action="store_true", help="only rebuild RESULTS.md")
    parser.add_argument("--list", action="store_true", help="list targets and mutant counts")
    parser.add_argument(
        "--retry",
        action="store_true",
        help="run again only the mutants not killed last time, nor listed as equivalent",
    )
    args = parser.parse_args(argv)
    config = tomllib.loads(CONFIG.read_text())
    operators = config["operators"]
    targets = [
        t for t in config["target"] if not args.only or any(w in t["module"] for w in args.only)
    ]
    if args.list:
        for t in targets:
            count = len(work_items(ROOT / t["module"], operators, t.get("functions")))
            print(f"{t['module']}: {count} mutants; tests: {' '.join(t['tests'])}")
        return 0
    if not args.report:
        RESULTS_DIR.mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="safepg-mutate-"))
        try:
            scratch_copy(scratch)
            for target in targets:
                out = RESULTS_DIR / f"{slug(target['module'])}.json"
                previous = None
                if args.retry and out.exists():
                    previous = json.loads(out.read_text())
                    source = hashlib.sha256((ROOT / target["module"]).read_bytes()).hexdigest()
                    if previous.get("source_sha256", source) != source:  # older files: trusted
                        raise SystemExit(f"{target['module']} changed since its last run: run all")
                result = run_target(target, operators, float(config["timeout"]), scratch, previous)
                out.write_text(json.dumps(result, indent=1) + "\n")
                report(config)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return report(config)


if __name__ == "__main__":
    sys.exit(main())
