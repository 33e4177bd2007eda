"""vmconfine-aa-helper's profile lifecycle with a recording stand-in for apparmor_parser.

``--parser FAKE`` makes the helper run a small script that logs its arguments, writes a
stand-in binary for ``-o FILE`` and exits with a chosen status; the securityfs directory the
helper loads and unloads through is a scratch directory (``.load`` / ``.replace`` / ``.remove``
files record what was written). So compiling, loading, replacing, unloading, the
unchanged-profile shortcut, the already-unloaded warning (ENOENT) and the 0-byte profile
repair are checked without an AppArmor kernel. The real parser is exercised in
tests/host/test_aa_parser.py; the compiled-policy cache in tests/unit/test_aa_cache.py.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from vmconfine_aa_helper import files as pf
from vmconfine_aa_helper.cache import policy_key
from vmconfine_aa_helper.main import run

UUID = "6f1c1e3e-3c1a-4a53-9a55-8d1c7f1f2a10"
NAME = f"vmconfine-{UUID}"
XML = """<domain type='qemu'>
  <name>life</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


#: the fake parser's stand-in for a compiled policy
BINARY = b"compiled policy\n"


def fake_parser(path: Path, log: Path, status: int = 0) -> None:
    """A recording apparmor_parser: logs its arguments, writes BINARY to the ``-o`` file,
    exits with ``status``."""
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'prev=""\n'
        'for a in "$@"; do\n'
        '  if [ "$prev" = "-o" ]; then printf "compiled policy\\n" > "$a"; fi\n'
        '  prev="$a"\n'
        "done\n"
        f"exit {status}\n"
    )
    path.chmod(0o755)


class Fake:
    """A scratch dir with a fake apparmor_parser that records every call, and a scratch
    securityfs (set by the ``securityfs`` fixture) recording what is loaded."""

    def __init__(self, base: Path, status: int = 0) -> None:
        self.base = base
        self.profiles = base / "profiles"
        self.log = base / "parser.log"
        self.parser = base / "fake_parser"
        self.securityfs = base / "securityfs"
        self.securityfs.mkdir(exist_ok=True)
        fake_parser(self.parser, self.log, status)
        (base / "a.img").touch()
        (base / "b.img").touch()

    def xml(self, disk: str = "a.img") -> str:
        return XML.format(uuid=UUID, disk=self.base / disk)

    def run(self, *args: str, xml: str = "") -> tuple[int, str, str]:
        argv = [*args, "-u", NAME, "-P", str(self.profiles), "--parser", str(self.parser)]
        if args[0] in ("-c", "-r"):
            argv += ["--uri", f"qemu:///embed?root={self.base}/inst"]
        out, err = io.StringIO(), io.StringIO()
        rc = run(argv, io.BytesIO(xml.encode()), out, err)
        return rc, out.getvalue(), err.getvalue()

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def loads(self) -> list[tuple[str, bytes]]:
        """(".load" | ".replace", policy) written to the scratch securityfs, then cleared."""
        found = []
        for iface in (".load", ".replace"):
            path = self.securityfs / iface
            if path.is_file() and path.stat().st_size:
                found.append((iface, path.read_bytes()))
                path.write_bytes(b"")
        return found

    @property
    def cache_dir(self) -> Path:
        return self.base / "inst" / "cache" / "qemu" / "apparmor"

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.cache_dir.iterdir()) if self.cache_dir.exists() else []

    @property
    def profile(self) -> Path:
        return self.profiles / NAME

    @property
    def files(self) -> Path:
        return self.profiles / f"{NAME}.files"

    @property
    def hashfile(self) -> Path:
        return self.profiles / f"{NAME}.hash"


@pytest.fixture(autouse=True)
def _scratch_securityfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interface files of an AppArmor kernel, as empty files; no profile list (the
    helper then cannot tell what is loaded, as on a host without securityfs)."""
    (tmp_path / "securityfs").mkdir(exist_ok=True)
    for iface in (".load", ".replace", ".remove"):
        (tmp_path / "securityfs" / iface).touch()
    monkeypatch.setattr(pf, "SECURITYFS", str(tmp_path / "securityfs"))


def test_create_compiles_with_include_dirs_then_loads(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    rc, out, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    assert out == ""
    (call,) = f.calls()
    args = call.split()
    assert args[:2] == ["-Q", "-K"] and args[-1] == str(f.profile)
    assert ["-I", str(f.profiles)] == args[2:4] and args[4] == "-I"
    assert Path(args[5], "abstractions", "vmconfine-qemu").is_file()
    assert args[6] == "-o"
    # the compiled binary is loaded (securityfs .load: a new profile) and kept in the cache
    assert f.loads() == [(".load", BINARY)]
    text = f.profile.read_text()
    assert f"\nprofile {NAME} flags=(attach_disconnected) {{" in text
    assert f'#include "{f.files}"' in text
    assert f'"{tmp_path}/a.img" rwk,' in f.files.read_text()
    key = policy_key(text, f.files.read_text(), str(f.files),
                     pf.include_dirs(str(f.profiles)), str(f.parser))
    assert key is not None and f.hashfile.read_text().strip() == key
    assert f.entries() == [f"{NAME}.{key}"]
    assert (f.cache_dir / f"{NAME}.{key}" / "policy.bin").read_bytes() == BINARY
    assert oct(f.files.stat().st_mode & 0o777) == "0o644"


def test_replace_regenerates_only_on_change(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", "--compile-only", xml=f.xml())[0] == 0
    stat_before = f.files.stat()
    # unchanged: the files are not rewritten and the parser is not run
    rc, _, err = f.run("-r", "--compile-only", xml=f.xml())
    assert rc == 0, err
    assert len(f.calls()) == 1
    assert f.files.stat().st_ino == stat_before.st_ino
    # changed: rules rewritten, parser runs again
    rc, _, err = f.run("-r", "--compile-only", xml=f.xml("b.img"))
    assert rc == 0, err
    assert len(f.calls()) == 2 and f.calls()[1].startswith("-Q -K")
    assert f'"{tmp_path}/b.img" rwk,' in f.files.read_text()
    assert "a.img" not in f.files.read_text()
    assert f.loads() == []  # compile-only mode never loads


def test_replace_without_kernel_list_always_loads(tmp_path: Path) -> None:
    """When the kernel's profile list cannot be read the helper cannot know the profile is
    still loaded, so it never skips the load; an unchanged profile is not compiled again."""
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    assert f.loads() == [(".load", BINARY)]
    assert f.run("-r", xml=f.xml())[0] == 0
    assert f.loads() == [(".replace", BINARY)]
    assert len(f.calls()) == 1


def test_replace_of_a_loaded_unchanged_profile_does_nothing(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    f.loads()
    (f.securityfs / "profiles").write_text(f"other (enforce)\n{NAME} (enforce)\n")
    assert f.run("-r", xml=f.xml())[0] == 0
    assert f.loads() == [] and len(f.calls()) == 1
    assert f.run("-r", xml=f.xml("b.img"))[0] == 0  # changed: compiled and replaced
    assert f.loads() == [(".replace", BINARY)] and len(f.calls()) == 2


def test_failed_compile_removes_new_profile(tmp_path: Path) -> None:
    f = Fake(tmp_path, status=1)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 1 and "failed (exit 1)" in err and len(err.splitlines()) == 1
    assert list(f.profiles.iterdir()) == []
    assert f.entries() == [] and f.loads() == []


def test_failed_load_removes_new_profile(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    (f.securityfs / ".load").unlink()
    (f.securityfs / ".load").mkdir()  # opening it for writing fails (EISDIR)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 1 and f"cannot load {f.profile}: " in err and len(err.splitlines()) == 1
    assert list(f.profiles.iterdir()) == []
    assert f.entries() == []  # only a policy the kernel took is cached


def test_failed_replace_restores_previous_rules(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    before = f.files.read_text()
    f.parser.write_text("#!/bin/sh\nexit 1\n")
    rc, _, err = f.run("-r", xml=f.xml("b.img"))
    assert rc == 1, err
    assert f.files.read_text() == before and f.profile.exists()


def test_delete_removes_everything_but_the_cache(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    assert sorted(p.name for p in f.profiles.iterdir()) == [NAME, f"{NAME}.files",
                                                            f"{NAME}.hash"]
    entries = f.entries()
    rc, _, err = f.run("-D")
    assert rc == 0, err
    assert list(f.profiles.iterdir()) == []
    assert f.entries() == entries and len(entries) == 1
    # -D again is harmless (teardown must be idempotent)
    assert f.run("-D")[0] == 0


def test_remove_unloads_and_keeps_files(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    calls = f.calls()
    rc, _, err = f.run("-R")
    assert rc == 0, err
    assert (f.securityfs / ".remove").read_text() == NAME  # by name, no parser run
    assert f.calls() == calls
    assert f.profile.exists() and f.files.exists() and not f.hashfile.exists()


def gone(monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    """Make the kernel answer a write to securityfs .remove with ``error``."""
    real = pf._write_iface

    def answer(iface: str, data: bytes, what: str) -> None:
        if iface == ".remove":
            raise error
        real(iface, data, what)

    monkeypatch.setattr(pf, "_write_iface", answer)


def test_remove_of_unloaded_profile_warns(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    gone(monkeypatch, FileNotFoundError(2, "No such file or directory"))
    rc, _, err = f.run("-R")
    assert rc == 0
    assert err.strip() == (f"vmconfine-aa-helper: warning: unable to unload already unloaded "
                           f"profile {NAME}")


def test_remove_failure_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    gone(monkeypatch, PermissionError(13, "Permission denied"))
    rc, _, err = f.run("-R")
    assert rc == 1 and f"refused to unload profile {NAME}: Permission denied" in err
    assert f.hashfile.exists()


def test_remove_without_apparmor_is_an_error(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    (f.securityfs / ".remove").unlink()  # no securityfs interface: AppArmor is off
    rc, _, err = f.run("-R")
    assert rc == 1 and "AppArmor is not enabled" in err


def test_zero_byte_profile_is_purged_and_recreated(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    f.profiles.mkdir()
    f.profile.write_text("")
    (f.securityfs / ".remove").touch()
    rc, _, err = f.run("-r", xml=f.xml())
    assert rc == 0, err
    assert "0 bytes" in err
    assert (f.securityfs / ".remove").read_text() == NAME  # unloaded by name ...
    assert f.calls()[0].startswith("-Q")      # ... then the recreated profile compiled
    assert f.loads() == [(".load", BINARY)]   # ... and loaded
    assert f.profile.stat().st_size > 0 and f"profile {NAME} " in f.profile.read_text()


def test_create_refuses_nonempty_but_repairs_zero_byte(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    f.profiles.mkdir()
    f.profile.write_text("")
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    assert f.profile.stat().st_size > 0


def test_append_file(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", "--compile-only", xml=f.xml())[0] == 0
    rc, _, err = f.run("-r", "--compile-only", "-F", str(tmp_path / "hot.img"), xml=f.xml())
    assert rc == 0, err
    text = f.files.read_text()
    assert text.endswith(f'  "{tmp_path}/hot.img" rwk,\n')
    assert f'"{tmp_path}/a.img" rwk,' in text
    # appending twice does not duplicate; a plain -r drops the appended rule again
    assert f.run("-r", "--compile-only", "-F", str(tmp_path / "hot.img"), xml=f.xml())[0] == 0
    assert f.files.read_text() == text
    assert f.run("-r", "--compile-only", xml=f.xml())[0] == 0
    assert "hot.img" not in f.files.read_text()


def test_admin_template_wins(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    f.profiles.mkdir()
    (f.profiles / "TEMPLATE.qemu").write_text(
        "#include <tunables/global>\nprofile VMCONFINE_TEMPLATE flags=(complain) {\n"
        "  #include <abstractions/vmconfine-qemu>\n  # site rule\n}\n")
    assert f.run("-c", "--compile-only", xml=f.xml())[0] == 0
    text = f.profile.read_text()
    assert "flags=(complain)" in text and "# site rule" in text and f"profile {NAME} " in text


def test_dryrun_prints_and_writes_nothing(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    rc, out, err = f.run("-c", "-d", xml=f.xml())
    assert rc == 0, err
    assert out.startswith(f"# {f.files}\n# DO NOT EDIT")
    assert f"# {f.profile}\n" in out and f"profile {NAME} " in out
    assert not f.profiles.exists() and f.calls() == []
    assert f.run("-c", "--compile-only", xml=f.xml())[0] == 0
    rc, out, _ = f.run("-D", "-d")
    assert rc == 0 and f"would delete {f.profile}" in out and f.profile.exists()


@pytest.mark.parametrize("cmd", ["-a", "-R"])
def test_commands_without_xml_do_not_read_stdin(tmp_path: Path, cmd: str) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", "--compile-only", xml=f.xml())[0] == 0
    rc, _, err = f.run(cmd, xml="not xml at all")
    assert rc == 0, err


def test_main_clears_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console entry point drops the caller's environment before doing anything."""
    import subprocess
    import sys

    f = Fake(tmp_path)
    f.parser.write_text(f"#!/bin/sh\n/usr/bin/env > {tmp_path}/env.txt\nexit 0\n")
    env = dict(os.environ, LD_PRELOAD="/nonexistent.so", SECRET="x", PATH="/evil:/usr/bin")
    proc = subprocess.run(
        [sys.executable, "-m", "vmconfine_aa_helper", "-c", "-u", NAME, "-P", str(f.profiles),
         "--parser", str(f.parser), "--uri", f"qemu:///embed?root={tmp_path}/inst",
         "--no-cache", "--compile-only"],
        input=f.xml().encode(), capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
                if "=" in line)
    assert seen.get("PATH") == "/sbin:/usr/sbin"
    assert "SECRET" not in seen and "LD_PRELOAD" not in seen
