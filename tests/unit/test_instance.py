"""Connection URIs and instance layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmconfine.config.instance import open_instance, parse_uri
from vmconfine.errors import URIError


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("qemu:///system", "system"),
        ("qemu+unix:///system", "system"),
        ("qemu:///session", "session"),
        ("qemu+unix:///session", "session"),
        ("qemu:///embed?root=/tmp/x", "embed"),
        ("qemu:///system/", "system"),
    ],
)
def test_local_uris(uri: str, kind: str) -> None:
    assert parse_uri(uri).kind == kind


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ssh://root@example.com/system",
        "qemu+tcp://example.com/system",
        "qemu://example.com/system",
        "qemu+tls://host/session",
    ],
)
def test_remote_uris_are_refused(uri: str) -> None:
    with pytest.raises(URIError, match="remote connections are not available yet"):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("xen:///system", "vmconfine drives QEMU only"),
        ("qemu:///embed", "needs exactly one root=DIR"),
        ("qemu:///embed?root=relative/dir", "must be an absolute path"),
        ("qemu:///other", "unknown instance path"),
        ("qemu+foo:///system", "unknown transport 'foo'"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(URIError, match=message):
        parse_uri(uri)


def test_embed_layout_is_under_root(tmp_path: Path) -> None:
    inst = open_instance(f"qemu:///embed?root={tmp_path}")
    assert inst.kind == "embed"
    assert inst.config_path == tmp_path / "etc" / "qemu.conf"
    for p in (inst.run_dir, inst.lib_dir, inst.cache_dir, inst.log_dir,
              inst.status_path("d"), inst.journal_path("d"), inst.monitor_path("d"),
              inst.user_monitor_path("d"), inst.log_path("d"), inst.domain_run_dir("d")):
        assert tmp_path in p.parents


def test_session_uses_xdg_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    inst = open_instance("qemu:///session")
    assert not inst.privileged
    assert inst.config_path == tmp_path / "cfg" / "vmconfine" / "qemu.conf"
    assert inst.run_dir == tmp_path / "rt" / "vmconfine" / "qemu"


def test_default_uri_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMCONFINE_DEFAULT_URI", f"qemu:///embed?root={tmp_path}")
    assert open_instance(None).kind == "embed"
