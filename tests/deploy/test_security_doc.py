"""docs/security.md names a test for every threat, and every test it names exists."""

from __future__ import annotations

import ast
import re

from deploy_helpers import ROOT

DOC = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _threat_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("threat", "---"):
            rows.append(cells)
    return rows


def test_every_threat_has_a_defense_and_a_test() -> None:
    rows = _threat_rows()
    assert len(rows) >= 14
    for threat, defense, proof in rows:
        assert defense, threat
        assert REFERENCE.search(proof), f"no test named for: {threat}"


def test_every_named_test_exists() -> None:
    references = REFERENCE.findall(DOC.read_text())
    assert references
    for path, name in references:
        source = ROOT / path
        assert source.is_file(), path
        tree = ast.parse(source.read_text())
        defined = {
            n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert name in defined, f"{path}::{name} does not exist"
