"""Every benchmark's --quick mode runs once and prints its table(s) with a ratio column.

This keeps bench/ from rotting. It never looks at a number: benchmarks report, CI does not
assert on time. (Without root, the root-only measurements print a "not available" row; the
table and its ratio column are still there.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO

BENCH_MODULES = ["p1_start", "p2_apparmor", "p3_mcs", "p4_relabel", "p5_concurrency",
                 "p6_memory", "p7_daemon"]


def tables(output: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables in ``output``: (header cells, data rows)."""
    found: list[tuple[list[str], list[list[str]]]] = []
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("| "):
                rows.append([c.strip() for c in lines[j].strip("|").split("|")])
                j += 1
            found.append((head, rows))
            i = j
        else:
            i += 1
    return found


@pytest.mark.parametrize("module", BENCH_MODULES)
def test_quick_mode_prints_a_table_with_a_ratio_column(module: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"bench.{module} --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    found = tables(proc.stdout)
    assert found, f"bench.{module} printed no table:\n{proc.stdout}"
    for head, rows in found:
        assert "ratio" in head, f"a table of bench.{module} has no ratio column: {head}"
        assert rows, f"a table of bench.{module} has no rows"
        col = head.index("ratio")
        assert all(len(r) == len(head) and r[col] for r in rows), rows


def test_table_parser_sees_a_missing_ratio_column() -> None:
    text = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    (head, rows), = tables(text)
    assert head == ["a", "b"] and rows == [["1", "2"]]
    assert "ratio" not in head
