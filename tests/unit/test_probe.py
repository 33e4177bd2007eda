"""vmconfine.qemu.probe: how an emulator is run (no privileges, clean environment, timeout,
bounded output) and when a cached answer is trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmconfine.qemu import probe
from vmconfine.qemu.probe import DiskCache, EmulatorProbe, ProbeError, ProbeUser


def me() -> ProbeUser:
    return ProbeUser(os.getuid(), os.getgid(), tuple(sorted(set(os.getgroups()))))


def script(tmp_path: Path, body: str, name: str = "emu") -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture(autouse=True)
def fresh_memory() -> None:
    probe._MEMORY.clear()


def cache_in(tmp_path: Path) -> DiskCache:
    """A disk cache in an existing directory (as an instance's, made by its first start)."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    return DiskCache(tmp_path / "cache")


def test_runs_without_privileges_and_environment(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("SECRET", "x")
    emu = script(tmp_path, "grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' "
                 "/proc/self/status; env; ls /proc/self/fd; readlink /proc/self/fd/0")
    fd = os.open(tmp_path, os.O_RDONLY)
    keep = os.dup2(fd, 57, inheritable=True)  # an fd without close-on-exec must not leak
    os.close(fd)
    try:
        out = EmulatorProbe(me()).run([emu, "-L", "help"], emulator=emu)
    finally:
        os.close(keep)
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line
                  and line.split(":", 1)[0] in ("CapEff", "CapPrm", "CapBnd", "CapAmb",
                                                "NoNewPrivs"))
    assert {k: v.strip() for k, v in fields.items()} == {
        "CapEff": "0" * 16, "CapPrm": "0" * 16, "CapBnd": "0" * 16 if os.geteuid() == 0
        else fields["CapBnd"].strip(), "CapAmb": "0" * 16, "NoNewPrivs": "1"}
    env = [ln.split("=", 1)[0] for ln in out.splitlines() if "=" in ln]
    assert "SECRET" not in env and "LD_PRELOAD" not in env and "PATH" in env
    assert "57" not in out.split()
    assert "/dev/null" in out


def test_failures_are_one_line_naming_the_emulator(tmp_path: Path) -> None:
    runner = EmulatorProbe(me(), timeout=1)
    cases = {
        script(tmp_path, "exec sleep 30", "hang"): "did not finish within 1 s",
        script(tmp_path, "echo 'bad\x1b]0;title\x07' >&2; exit 3", "fail"): "status 3",
        script(tmp_path, "kill -SEGV $$", "crash"): "SIGSEGV",
        script(tmp_path, "head -c 6000000 /dev/zero", "chatty"): "more than 4 MiB",
        str(tmp_path / "missing"): "No such file or directory",
    }
    for emu, why in cases.items():
        with pytest.raises(ProbeError) as err:
            runner.run([emu, "-L", "help"], emulator=emu)
        msg = err.value.message
        assert why in msg and emu in msg and "\n" not in msg and "\x1b" not in msg, msg


def test_answers_are_cached_on_disk_by_file_identity(tmp_path: Path) -> None:
    count = tmp_path / "count"
    emu = script(tmp_path, f"echo x >> {count}; echo /usr/share/qemu")
    cache = cache_in(tmp_path)
    assert EmulatorProbe(me(), cache).run([emu], emulator=emu) == "/usr/share/qemu\n"
    probe._MEMORY.clear()
    assert EmulatorProbe(me(), cache).run([emu], emulator=emu) == "/usr/share/qemu\n"
    assert count.read_text().count("x") == 1  # the second answer came from the disk cache
    files = list((tmp_path / "cache" / probe.CACHE_SUBDIR).iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temporary file left
    assert files[0].stat().st_mode & 0o077 == 0
    # a changed binary (new mtime/size) is probed again
    Path(emu).write_text(Path(emu).read_text() + "# changed\n")
    probe._MEMORY.clear()
    EmulatorProbe(me(), cache).run([emu], emulator=emu)
    assert count.read_text().count("x") == 2
    # a cache dir that does not exist is not created (a report on a fresh instance)
    probe._MEMORY.clear()
    EmulatorProbe(me(), DiskCache(tmp_path / "fresh")).run([emu], emulator=emu)
    assert not (tmp_path / "fresh").exists()


def planted(tmp_path: Path, value: str) -> tuple[str, DiskCache, EmulatorProbe, list, Path]:
    """A probe of a script printing "real", with ``value`` already in its disk cache."""
    emu = script(tmp_path, "echo real")
    cache = cache_in(tmp_path)
    runner = EmulatorProbe(me(), cache)
    key = runner.key("run", [emu], [emu])
    cache.put(key, value)
    return emu, cache, runner, key, next((tmp_path / "cache" / probe.CACHE_SUBDIR).iterdir())


def test_a_cache_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    emu, cache, runner, key, path = planted(tmp_path, "forged\n")
    assert runner.run([emu], emulator=emu) == "forged\n"  # our own file is used...
    path.chmod(0o666)
    probe._MEMORY.clear()
    assert runner.run([emu], emulator=emu) == "real\n"  # ...one others can write is not
    (tmp_path / "cache" / probe.CACHE_SUBDIR).chmod(0o777)
    cache.put(key, "forged\n")  # nor anything in a directory others can write
    probe._MEMORY.clear()
    assert cache.get(key) is None
    assert runner.run([emu], emulator=emu) == "real\n"


def test_a_cache_record_for_another_key_is_ignored(tmp_path: Path) -> None:
    _emu, cache, _runner, key, path = planted(tmp_path, "x")
    assert cache.get(key) == "x"
    path.write_text(json.dumps({"key": ["other"], "value": "forged\n"}))
    assert cache.get(key) is None


def test_regular_file_refuses_devices_and_fifos(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises(ProbeError, match="not a regular file"):
            probe.regular_file(path)
