"""Running ``safepg … --json`` in-process, with every document checked against the JSON Schema
that ships for its ``schema`` (`safepg._cli._output.schema_file`).

Each document is validated twice: against the shipped schema as it is (what users get, which
lets later versions add keys), and against a strict copy that allows no key the schema does
not describe, so that the schema documents every key the command prints.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from safepg._cli import main
from safepg._cli._output import schema_file


@functools.cache
def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_file(name).read_text())
    return loaded


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        # Object definitions (with "required"), not the conditions on them (if/then).
        if "properties" in node and "required" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
    elif isinstance(node, list):
        node = [_strict(v) for v in node]
    return node


@functools.cache
def strict_schema(name: str) -> dict[str, Any]:
    strict: dict[str, Any] = _strict(copy.deepcopy(schema(name)))
    return strict


def validate(doc: dict[str, Any]) -> None:
    """*doc* matches the schema it names, and the schema describes every key of it."""
    name = doc["schema"]
    for which in (schema(name), strict_schema(name)):
        jsonschema.Draft202012Validator(which).validate(doc)
    assert list(doc)[:4] == ["schema", "ok", "exit_code", "error"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """``safepg ARGV --json``: the exit code and the document, validated."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    data: dict[str, Any] = json.loads(out)
    assert data["exit_code"] == code
    assert data["ok"] is (code in (0, 4) if data["schema"] == "safepg.inspect/1" else code == 0)
    validate(data)
    return code, data
