"""The suite's own rules, checked on its source: a test skips only through
``tests.support.require`` (CI turns those skips into failures; ``pytest.importorskip`` would
pass silently without the package), and no test uses a fixed path in a world-writable
directory (another user can create it first: use ``tmp_path`` or a fresh ``mkdtemp``). A string
that only names such a path for a pure function carries the waiver comment on its line."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
#: world-writable directories: a fixed name there can be taken by anyone first
SHARED_DIRS = tuple("/" + d + "/" for d in ("tmp", "var/tmp", "dev/shm"))


#: on the line of a string that only names a path (given to a pure function, never opened)
WAIVER = "# test-rules: path never touched"


def violations(source: str, name: str) -> list[str]:
    """Every ``importorskip`` and every string naming a path inside a shared directory
    (unless its line carries :data:`WAIVER`)."""
    out = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, name)):
        line = getattr(node, "lineno", 0)
        if 0 < line <= len(lines) and WAIVER in lines[line - 1]:
            continue
        if (isinstance(node, ast.Attribute) and node.attr == "importorskip") or (
                isinstance(node, ast.Name) and node.id == "importorskip"):
            out.append(f"{name}:{node.lineno}: importorskip (use tests.support.require)")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(SHARED_DIRS)):
            out.append(f"{name}:{node.lineno}: fixed path {node.value!r} (use tmp_path)")
    return out


def test_no_importorskip_and_no_fixed_shared_paths() -> None:
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue
        found += violations(path.read_text(), str(path.relative_to(TESTS.parent)))
    assert not found, "\n".join(found)


def test_the_scan_finds_what_it_forbids() -> None:
    """The control: each forbidden form is reported, the allowed ones are not."""
    tmp = "/" + "tmp"
    bad = (f'import pytest\nselinux = pytest.importorskip("selinux")\n'
           f'P = "{tmp}/a\\nb"\nQ = f"{tmp}/{{x}}"\nR = "/var{tmp}/fixed"\n')
    assert len(violations(bad, "bad.py")) == 4
    good = (f'import tempfile\nd = tempfile.mkdtemp(dir="{tmp}")\n'
            'from tests.support import require\n'
            f'assert not protected("{tmp}/x")  {WAIVER}\n')
    assert violations(good, "good.py") == []


def duplicate_basenames(paths: list[Path]) -> list[str]:
    seen: dict[str, Path] = {}
    dups = []
    for p in paths:
        if p.name in seen:
            dups.append(f"{seen[p.name]} and {p}")
        seen.setdefault(p.name, p)
    return dups


def test_test_modules_have_unique_basenames() -> None:
    """The tier folders are not packages: two test_x.py in different tiers collide when one
    pytest run collects both (as CI does)."""
    modules = sorted(p for p in TESTS.rglob("test_*.py") if "guest" not in p.parts)
    assert duplicate_basenames(modules) == []
    assert duplicate_basenames([Path("a/test_x.py"), Path("b/test_x.py")]) == [
        "a/test_x.py and b/test_x.py"]
