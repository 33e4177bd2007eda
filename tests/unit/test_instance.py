"""Connection URIs and instance layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmconfine.config.instance import open_instance, parse_remote, parse_uri
from vmconfine.config.layout import plain_daemon_socket
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
def test_remote_uris_are_not_local_instances(uri: str) -> None:
    """A remote URI names another host's daemon: no local instance opens it."""
    with pytest.raises(URIError, match="is a remote URI: this verb runs on the host itself"):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("uri", "transport", "host", "port", "user", "remote_uri", "params"),
    [
        ("qemu+ssh://root@example.com/system", "ssh", "example.com", None, "root",
         "qemu:///system", {}),
        ("qemu+ssh://h:2222/session?keyfile=/k&no_verify=1&socket=/s&command=/bin/v", "ssh",
         "h", 2222, None, "qemu:///session",
         {"keyfile": "/k", "no_verify": "1", "socket": "/s", "command": "/bin/v"}),
        ("qemu://example.com/system", "tls", "example.com", None, None, "qemu:///system", {}),
        ("qemu+tls://h:16515/embed?root=/r&pkipath=/p", "tls", "h", 16515, None,
         "qemu:///embed?root=/r", {"pkipath": "/p"}),
    ],
)
def test_remote_uris_parse(uri: str, transport: str, host: str, port: int | None,
                           user: str | None, remote_uri: str, params: dict[str, str]) -> None:
    r = parse_remote(uri)
    assert r is not None
    assert (r.transport, r.host, r.port, r.user, r.remote_uri, r.params) == (
        transport, host, port, user, remote_uri, params)
    assert parse_remote("qemu:///system") is None


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("qemu+tcp://example.com/system", "plain, unauthenticated TCP"),
        ("qemu+libssh://h/system", "transport 'libssh' is not supported"),
        ("qemu+ssh:///system", "names no host"),
        ("qemu+ssh://-oProxyCommand=x/system", "not a valid host or user name"),
        ("qemu+ssh://h/other", "unknown instance path"),
    ],
)
def test_bad_remote_uris(uri: str, message: str) -> None:
    with pytest.raises(URIError, match=message):
        parse_remote(uri)


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


@pytest.mark.parametrize("uri", [
    "qemu:///session", "qemu+unix:///session/", "qemu:///system", "qemu:///embed?root=/srv/vm",
    "qemu:///embed/?root=/srv//vm/../vm2/", "qemu+unix:///embed?root=/a"])
@pytest.mark.parametrize("runtime", ["/run/user/4242/", "relative", None])
@pytest.mark.parametrize("readonly", [False, True])
def test_plain_daemon_socket_agrees_with_the_instance(uri: str, runtime: str | None,
                                                      readonly: bool, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's fast path to the daemon's socket finds the socket the instance module
    spells (the daemon listens there)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if runtime is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    plain = plain_daemon_socket(uri, readonly=readonly)
    if uri == "qemu:///system" and os.geteuid() != 0:
        assert plain is None  # open_instance refuses it, with its reason
        return
    inst = open_instance(uri)
    assert plain is not None
    assert plain[0] == inst.kind
    assert Path(plain[1]) == (inst.daemon_ro_socket_path if readonly else
                              inst.daemon_socket_path)


@pytest.mark.parametrize("uri", [
    "qemu:///embed?root=relative", "qemu:///embed?root=/a&root=/b", "qemu:///embed?root=/a%20b",
    "qemu+ssh://host/system", "qemu:///sessionx", "qemu://host/session", "xen:///system"])
def test_plain_daemon_socket_leaves_the_rest_to_the_uri_parser(uri: str) -> None:
    assert plain_daemon_socket(uri, readonly=False) is None


@pytest.mark.parametrize("uri", ["qemu://[/system", "qemu+ssh://[::1/system",
                                 "qemu+tls://[zz]x/system"])
def test_malformed_uris_are_one_line_uri_errors(uri: str) -> None:
    """urllib's ValueError (an unclosed IPv6 bracket...) becomes the CLI's one-line error."""
    for parse in (parse_uri, parse_remote):
        with pytest.raises(URIError, match=r"^malformed connection URI '.*': Invalid IPv6 URL"):
            parse(uri)
