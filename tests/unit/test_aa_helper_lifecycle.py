"""vmconfine-aa-helper's profile lifecycle with a recording stand-in for apparmor_parser.

``--parser FAKE`` makes the helper run a small script that logs its arguments (and stdin) and
exits with a chosen status, so loading, replacing, the unchanged-profile shortcut, the
already-unloaded warning (exit 234) and the 0-byte profile repair are checked without an
AppArmor kernel. The real parser is exercised in tests/host/test_aa_parser.py.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from vmconfine_aa_helper.files import content_hash
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


class Fake:
    """A scratch dir with a fake apparmor_parser that records every call."""

    def __init__(self, base: Path, status: int = 0, minus_r_status: int | None = None) -> None:
        self.base = base
        self.profiles = base / "profiles"
        self.log = base / "parser.log"
        self.parser = base / "fake_parser"
        r_status = status if minus_r_status is None else minus_r_status
        self.parser.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> {self.log}\n'
            f'case "$1" in -R) /usr/bin/cat >> {self.log}; exit {r_status};; esac\n'
            f"exit {status}\n"
        )
        self.parser.chmod(0o755)
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

    @property
    def profile(self) -> Path:
        return self.profiles / NAME

    @property
    def files(self) -> Path:
        return self.profiles / f"{NAME}.files"

    @property
    def hashfile(self) -> Path:
        return self.profiles / f"{NAME}.hash"


def test_create_loads_with_include_dirs(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    rc, out, err = f.run("-c", xml=f.xml())
    assert rc == 0, err
    assert out == ""
    (call,) = f.calls()
    args = call.split()
    assert args[0] == "-a" and args[-1] == str(f.profile)
    assert ["-I", str(f.profiles)] == args[2:4] and args[4] == "-I"
    assert Path(args[5], "abstractions", "vmconfine-qemu").is_file()
    text = f.profile.read_text()
    assert f"\nprofile {NAME} flags=(attach_disconnected) {{" in text
    assert f'#include "{f.files}"' in text
    assert f'"{tmp_path}/a.img" rwk,' in f.files.read_text()
    assert f.hashfile.read_text().strip() == content_hash(text, f.files.read_text(), f.profiles)
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


def test_replace_without_kernel_list_always_loads(tmp_path: Path) -> None:
    """When the kernel's profile list cannot be read the helper cannot know the profile is
    still loaded, so it never skips apparmor_parser -r."""
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    assert f.run("-r", xml=f.xml())[0] == 0
    assert [c.split()[0] for c in f.calls()] == ["-a", "-r"]


def test_failed_load_removes_new_profile(tmp_path: Path) -> None:
    f = Fake(tmp_path, status=1)
    rc, _, err = f.run("-c", xml=f.xml())
    assert rc == 1 and "failed (exit 1)" in err and len(err.splitlines()) == 1
    assert list(f.profiles.iterdir()) == []


def test_failed_replace_restores_previous_rules(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    before = f.files.read_text()
    f.parser.write_text("#!/bin/sh\nexit 1\n")
    rc, _, err = f.run("-r", xml=f.xml("b.img"))
    assert rc == 1, err
    assert f.files.read_text() == before and f.profile.exists()


def test_delete_removes_everything(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    assert sorted(p.name for p in f.profiles.iterdir()) == [NAME, f"{NAME}.files",
                                                            f"{NAME}.hash"]
    rc, _, err = f.run("-D")
    assert rc == 0, err
    assert list(f.profiles.iterdir()) == []
    # -D again is harmless (teardown must be idempotent)
    assert f.run("-D")[0] == 0


def test_remove_unloads_and_keeps_files(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    assert f.run("-c", xml=f.xml())[0] == 0
    rc, _, err = f.run("-R")
    assert rc == 0, err
    assert f.calls()[-1] == f"-R -K -I {f.profiles} -I {f.calls()[0].split()[5]} {f.profile}"
    assert f.profile.exists() and f.files.exists() and not f.hashfile.exists()


def test_remove_of_unloaded_profile_warns(tmp_path: Path) -> None:
    f = Fake(tmp_path, minus_r_status=234)
    assert f.run("-c", xml=f.xml())[0] == 0
    rc, _, err = f.run("-R")
    assert rc == 0
    assert err.strip() == (f"vmconfine-aa-helper: warning: unable to unload already unloaded "
                           f"profile {NAME}")


def test_remove_failure_is_an_error(tmp_path: Path) -> None:
    f = Fake(tmp_path, minus_r_status=1)
    assert f.run("-c", xml=f.xml())[0] == 0
    rc, _, err = f.run("-R")
    assert rc == 1 and "apparmor_parser -R" in err


def test_zero_byte_profile_is_purged_and_recreated(tmp_path: Path) -> None:
    f = Fake(tmp_path)
    f.profiles.mkdir()
    f.profile.write_text("")
    rc, _, err = f.run("-r", xml=f.xml())
    assert rc == 0, err
    assert "0 bytes" in err
    calls = f.calls()
    assert calls[0].startswith("-R")          # unload by name (stub on stdin) ...
    assert calls[1] == f"profile {NAME} {{}}"
    assert calls[2].startswith("-a")          # ... then load the recreated profile
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
         "--parser", str(f.parser), "--uri", f"qemu:///embed?root={tmp_path}/inst"],
        input=f.xml().encode(), capture_output=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
                if "=" in line)
    assert seen.get("PATH") == "/sbin:/usr/sbin"
    assert "SECRET" not in seen and "LD_PRELOAD" not in seen
