"""The compiled-policy cache of vmconfine-aa-helper, its key, ``--cached`` and the launcher.

A restart with unchanged content must load the cached binary without compiling; anything the
compiled policy depends on (template, abstraction, files included from any search directory,
the parser, the kernel) must change the key; a damaged or foreign entry must never be loaded.
Uses the recording parser and scratch securityfs of test_aa_helper_lifecycle.
"""

from __future__ import annotations

import getopt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_aa_helper_lifecycle import BINARY, NAME, Fake
from vmconfine_aa_helper import cache as aacache
from vmconfine_aa_helper import files as pf
from vmconfine_aa_helper.launch import command
from vmconfine_aa_helper.options import split_args
from vmconfine_aa_helper.paths import Refusal


@pytest.fixture(autouse=True)
def _scratch_securityfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "securityfs").mkdir(exist_ok=True)
    for iface in (".load", ".replace", ".remove"):
        (tmp_path / "securityfs" / iface).touch()
    monkeypatch.setattr(pf, "SECURITYFS", str(tmp_path / "securityfs"))


def compiles(f: Fake) -> int:
    return sum(" -o " in c for c in f.calls())


def started(f: Fake) -> str:
    """-c, then -D (a stopped domain): returns the cache key of the profile."""
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    key = f.hashfile.read_text().strip()
    assert f.run("-D")[0] == 0
    f.loads()
    return key


def test_restart_loads_the_cached_policy_without_compiling(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    first = (f.profile.read_text(), f.files.read_text(), f.hashfile.read_text())
    assert f.run("-D")[0] == 0 and not f.profile.exists()
    f.loads()
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    assert compiles(f) == 1  # only the first start compiled
    assert f.loads() == [(".load", BINARY)]
    assert (f.profile.read_text(), f.files.read_text(), f.hashfile.read_text()) == first
    entry = f.cache_dir / f"{NAME}.{first[2].strip()}"
    assert oct(f.cache_dir.stat().st_mode & 0o777) == "0o700"
    assert oct(entry.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in entry.iterdir()} == {"0o600"}


@pytest.mark.parametrize("change", ["template", "abstraction", "include-dir", "parser"])
def test_what_the_policy_depends_on_changes_the_key(tmp_path: Path, change: str) -> None:
    f = Fake(tmp_path)
    key = started(f)
    if change == "template":
        f.profiles.mkdir(exist_ok=True)
        (f.profiles / "TEMPLATE.qemu").write_text(
            "profile VMCONFINE_TEMPLATE {\n  #include <abstractions/vmconfine-qemu>\n}\n")
    elif change == "abstraction":  # a local copy shadows the shipped one (-I order)
        (f.profiles / "abstractions").mkdir(parents=True)
        (f.profiles / "abstractions" / "vmconfine-qemu").write_text("  /srv/x r,\n")
    elif change == "include-dir":  # the shipped abstraction includes vmconfine-qemu.d
        (f.profiles / "abstractions" / "vmconfine-qemu.d").mkdir(parents=True)
        (f.profiles / "abstractions" / "vmconfine-qemu.d" / "site").write_text("/srv/y r,\n")
    else:
        st = f.parser.stat()
        os.utime(f.parser, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    assert compiles(f) == 2
    new = f.hashfile.read_text().strip()
    assert new != key
    assert f.entries() == [f"{NAME}.{new}"]  # one entry per profile: the old one went


def test_key_follows_nested_includes_in_every_search_dir(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, local = tmp_path / "base", tmp_path / "local"
    (base / "tunables").mkdir(parents=True)
    (base / "abstractions").mkdir()
    local.mkdir()
    monkeypatch.setattr(aacache, "BASE_DIR", str(base))
    monkeypatch.setattr(aacache, "PARSER_CONF", str(tmp_path / "parser.conf"))
    (base / "tunables" / "global").write_text("include <tunables/home>\n")
    (base / "tunables" / "home").write_text("@{HOME}=/home/*/\n")
    (base / "abstractions" / "x").write_text("  #include <abstractions/y>\n  /x r,\n")
    (base / "abstractions" / "y").write_text("  /y r,\n")
    profile = ('#include <tunables/global>\nprofile p {\n  #include <abstractions/x>\n'
               f'  #include "{tmp_path}/p.files"\n}}\n')
    parser = str(tmp_path / "parser")
    Path(parser).write_text("#!/bin/sh\n")

    def key() -> str | None:
        return aacache.policy_key(profile, "rules\n", f"{tmp_path}/p.files", [str(local)],
                                  parser)

    first = key()
    assert first is not None and key() == first
    for change in (lambda: (base / "tunables" / "home").write_text("@{HOME}=/srv/\n"),
                   lambda: (base / "abstractions" / "y").write_text("  /etc/** r,\n"),
                   lambda: (local / "abstractions").mkdir() or
                   (local / "abstractions" / "y").write_text("  /y r,\n"),
                   lambda: (tmp_path / "parser.conf").write_text("policy-features=/x\n")):
        before = key()
        change()
        assert key() not in (before, None)
    assert aacache.policy_key(profile, "other rules\n", f"{tmp_path}/p.files", [str(local)],
                              parser) != key()
    (base / "abstractions" / "y").write_text("  include <abstractions/@{var}>\n")
    assert key() is None  # an include that cannot be followed: never cached


def test_include_statements_are_recognised() -> None:
    text = ("#include <a>\n  include <b>\n include if exists <c>\n  #include \"/abs/d\"\n"
            "abi <abi/3.0>,\n# include <comment>\n  /include/x r,\n  includes r,\n"
            "  include\t<e> # trailing\n")
    assert aacache._include_targets(text) == [("<", "a"), ("<", "b"), ("<", "c"),
                                              ('"', "/abs/d"), ("<", "abi/3.0"), ("<", "e")]


def test_damaged_entry_is_removed_and_compiled_again(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    key = started(f)
    (f.cache_dir / f"{NAME}.{key}" / "policy.bin").write_bytes(b"torn")
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0 and "was damaged" in err
    assert compiles(f) == 2 and f.loads() == [(".load", BINARY)]
    assert f.entries() == [f"{NAME}.{key}"]


def test_cache_that_is_not_private_is_not_used(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    key = started(f)
    f.cache_dir.chmod(0o777)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0 and "is not used" in err
    assert f.calls()[-1].startswith("-a -K ")  # compiled and loaded by the parser, no cache
    assert f.loads() == []
    assert f.run("-D")[0] == 0
    f.cache_dir.chmod(0o700)
    os.chown(f.cache_dir / f"{NAME}.{key}", 1, 1)  # an entry of another user
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0 and "not private" in err and compiles(f) == 2


def test_least_recently_used_entries_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aacache, "MAX_ENTRIES", 2)
    c = aacache.Cache(str(tmp_path / "cache"))
    assert c.usable(create=True)
    for i, name in enumerate(("a", "b", "c")):
        staging = c.stage(name)
        Path(staging, aacache.BINARY).write_bytes(b"x")
        c.commit(staging, name, f"{i}" * 64, "p", "f", b"x")
        os.utime(c.entry_path(name, f"{i}" * 64), (1000 + i, 1000 + i))
    assert sorted(os.listdir(c.root)) == [f"b.{'1' * 64}", f"c.{'2' * 64}"]
    assert c.policy("c", "2" * 64) == b"x" and c.policy("a", "0" * 64) is None


def test_cached_option_loads_without_xml(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    files, key = f.files.read_text(), f.hashfile.read_text().strip()
    assert f.run("-D")[0] == 0
    f.loads()
    rc, _, err = f.run("-c", "--cached", key, "--cache-dir", str(f.cache_dir), xml="not xml")
    assert rc == 0, err
    assert compiles(f) == 1 and f.loads() == [(".load", BINARY)]
    assert f.files.read_text() == files and f.hashfile.read_text().strip() == key
    # the same again while it exists: -r is a no-op, -c refuses
    rc, _, err = f.run("-c", "--cached", key, "--cache-dir", str(f.cache_dir))
    assert rc == 1 and "exists" in err


@pytest.mark.parametrize("problem", ["unknown key", "template", "parser", "damaged",
                                     "malformed", "with -f"])
def test_cached_option_refusals_change_nothing(tmp_path: Path, problem: str) -> None:
    f = Fake(tmp_path)
    key = started(f)
    extra: list[str] = []
    if problem == "unknown key":
        key = "0" * 64
    elif problem == "template":
        f.profiles.mkdir(exist_ok=True)
        (f.profiles / "TEMPLATE.qemu").write_text("profile VMCONFINE_TEMPLATE {\n}\n")
    elif problem == "parser":
        st = f.parser.stat()
        os.utime(f.parser, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif problem == "damaged":
        (f.cache_dir / f"{NAME}.{key}" / "policy.bin").write_bytes(b"torn")
    elif problem == "malformed":
        key = key.upper()
    else:
        extra = ["-f", str(tmp_path / "b.img")]
    before = sorted(p.name for p in f.profiles.iterdir()) if f.profiles.exists() else []
    rc, out, err = f.run("-c", "--cached", key, "--cache-dir", str(f.cache_dir), *extra)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1, err
    after = sorted(p.name for p in f.profiles.iterdir()) if f.profiles.exists() else []
    assert after == before and f.loads() == [] and compiles(f) == 1


def test_no_cache_compiles_every_time(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    for _ in range(2):
        assert f.run("-c", "--no-cache", xml=f.xml())[0] == 0
        assert f.run("-D")[0] == 0
    assert [c.split()[0] for c in f.calls()] == ["-a", "-a"]
    assert f.entries() == [] and f.loads() == []


ARGVS = [
    ["-c", "-u", "x"], ["-cdu", "x"], ["-cux"], ["--create", "--uuid=x"], ["--cr", "--uu", "x"],
    ["-r", "--add-file", "/a", "-u", "x"], ["--dry", "-c", "-ux", "--", "-r"], ["-c", "x", "-d"],
    ["-z"], ["--c"], ["--create=1"], ["-u"], ["--uuid"], ["--prefix", "p-", "-R", "-u", "x"],
    ["-P/d", "-D", "-u", "-c"], ["--help"], ["-", "-a"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_command_line_is_split_like_gnu_getopt(argv: list[str]) -> None:
    longs = ["add", "create", "dryrun", "delete", "help", "replace", "remove", "uuid=",
             "add-file=", "append-file=", "profile-dir=", "prefix=", "uri=", "compile-only",
             "parser=", "cache-dir=", "cached", "no-cache"]
    try:
        pairs, rest = getopt.gnu_getopt(argv, "acdDhrRu:f:F:P:", longs)
    except getopt.GetoptError:
        with pytest.raises(Refusal):
            split_args(argv)
        return
    mine, my_rest = split_args(argv)
    short = {"u": "uuid", "f": "add-file", "F": "append-file", "P": "profile-dir", "d": "dryrun",
             "h": "help", "a": "add", "c": "create", "r": "replace", "R": "remove",
             "D": "delete"}
    expected = [(short.get(o.lstrip("-"), o.lstrip("-")), v or None) for o, v in pairs]
    assert [(o, v or None) for o, v in mine] == expected and my_rest == rest


def test_isolated_launcher(tmp_path: Path) -> None:
    """The driver's way of running the helper: -I -S, only the helper's packages; PYTHON*
    variables are ignored and the parser still gets a cleared environment."""
    cmd = command()
    assert cmd is not None and cmd[1:3] == ["-I", "-S"]
    f = Fake(tmp_path)
    f.parser.write_text(f"#!/bin/sh\n/usr/bin/env > {tmp_path}/env.txt\nexit 0\n")
    env = {"PYTHONPATH": str(tmp_path / "evil"), "PYTHONSTARTUP": str(tmp_path / "evil.py"),
           "LD_PRELOAD": "/nonexistent.so", "PATH": "/evil:/usr/bin"}
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "vmconfine_aa_helper.py").write_text("raise SystemExit(99)\n")
    proc = subprocess.run(
        [*cmd, "-c", "-u", NAME, "-P", str(f.profiles), "--parser", str(f.parser),
         "--uri", f"qemu:///embed?root={tmp_path}/inst", "--no-cache", "--compile-only"],
        input=f.xml().encode(), capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
                if "=" in line)
    assert seen.get("PATH") == "/sbin:/usr/sbin" and "LD_PRELOAD" not in seen
    assert f.profile.is_file()
    probe = subprocess.run([cmd[0], *cmd[1:4], cmd[4].split("from vmconfine_aa_helper")[0] +
                            "print(sorted(m for m in sys.modules if m.startswith(('site', "
                            "'lxml', 'vmconfine'))))"], capture_output=True, text=True,
                           env={}, timeout=60, check=False)
    assert probe.stdout.strip() == "[]", probe.stderr  # nothing imported before the helper
    assert command(sys.executable)[0] == sys.executable  # type: ignore[index]
