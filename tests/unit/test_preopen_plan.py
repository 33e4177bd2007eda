"""Pre-opened resources (vmconfine.launch.preopen) and generated channel paths."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from vmconfine.domain import parse_domain
from vmconfine.domain.chardev import fill_channel_paths
from vmconfine.errors import LaunchError
from vmconfine.launch import preopen
from vmconfine.launch.journal import Journal
from vmconfine.qemu.fdpass import FDSET, PassedFd

DOMAIN = """<domain type='qemu'><name>gen</name><memory>32768</memory>
  <os><type>hvm</type></os><devices>
  <console type='pty'><target type='virtio'/></console>
  <channel type='unix'><source mode='bind'/>
    <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  <channel type='unix'><target type='virtio'/></channel>
  <channel type='unix'><source mode='bind' path='/given/x.sock'/>
    <target type='virtio' name='given'/></channel>
  </devices></domain>"""


def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "j.journal")


def test_listen_makes_an_owner_only_socket_and_journals_it_first(tmp_path: Path) -> None:
    j = journal(tmp_path)
    path = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a stale socket from before: replaced, as libvirt does
    stale.close()
    s = preopen.listen(j, str(path))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert [r["op"] for r in Journal(j.path).records("pipeline")] == ["socket",
                                                                          "socket-inode"]
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # listening already
    finally:
        s.close()


def test_listen_refuses_what_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(LaunchError, match="not a socket is there; remove it"):
        preopen.listen(journal(tmp_path), str(path))
    assert path.read_text() == "keep me"
    with pytest.raises(LaunchError, match=r"create the directory .*/missing"):
        preopen.listen(journal(tmp_path), str(tmp_path / "missing" / "x.sock"))


def test_remove_sockets_removes_only_what_is_still_ours(tmp_path: Path) -> None:
    j = journal(tmp_path)
    ours, replaced, gone = (str(tmp_path / n) for n in ("ours.sock", "re.sock", "gone.sock"))
    socks = [preopen.listen(j, p) for p in (ours, replaced, gone)]
    for s in socks:
        s.close()
    os.unlink(gone)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(tmp_path / "other.sock"))
    os.replace(tmp_path / "other.sock", replaced)  # someone else's socket at the path since
    j2 = Journal(j.path)
    errors = preopen.remove_sockets(j2.records("pipeline", "socket"),
                                    j2.records("pipeline", "socket-inode"))
    assert errors == []
    assert not os.path.lexists(ours)
    assert os.path.lexists(replaced)
    other.close()


def test_open_file_truncates_or_appends_and_keeps_the_owner(tmp_path: Path) -> None:
    j = journal(tmp_path)
    out = tmp_path / "serial.log"
    out.write_text("old\n")
    os.chown(out, 4321, 4321)
    fd = preopen.open_file(j, PassedFd(FDSET, str(out), "charserial0-source", append=True))
    os.write(fd, b"new\n")
    os.close(fd)
    assert out.read_text() == "old\nnew\n" and os.stat(out).st_uid == 4321
    fd = preopen.open_file(j, PassedFd(FDSET, str(out), "charserial0-source"))
    os.close(fd)
    assert out.read_text() == ""
    created = tmp_path / "new.log"
    os.close(preopen.open_file(j, PassedFd(FDSET, str(created), "charserial0-log")))
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o600
    recs = Journal(j.path).records("pipeline", "open")
    assert [(r["path"], r["existed"]) for r in recs] == [
        (str(out), True), (str(out), True), (str(created), False)]
    with pytest.raises(LaunchError, match=r"cannot open .*/nodir/x\.log .*create the directory"):
        preopen.open_file(j, PassedFd(FDSET, str(tmp_path / "nodir" / "x.log"), "x"))


def test_generated_channel_paths_are_live_only() -> None:
    dom = parse_domain(DOMAIN)
    dom.generated_paths = fill_channel_paths(dom.chardevs, "/var/lib/x/channel/target/domain-gen")
    assert dom.generated_paths == [
        "/var/lib/x/channel/target/domain-gen/org.qemu.guest_agent.0",
        "/var/lib/x/channel/target/domain-gen/vioser-00-00-02.sock"]
    assert [c.path for c in dom.chardevs if c.kind == "channel"] == [
        *dom.generated_paths, "/given/x.sock"]
    live = dom.to_xml(live=True, extra={"id": 1, "generated": dom.generated_paths})
    assert "org.qemu.guest_agent.0\"" in live and "vioser-00-00-02.sock" in live
    again = parse_domain(live)
    assert again.generated_paths == dom.generated_paths
    inactive = again.to_xml(live=False)
    assert "channel/target" not in inactive and "/given/x.sock" in inactive
    # the inactive XML parses back to a channel without a path, which starts again
    assert parse_domain(inactive).chardevs[1].path is None


def test_unix_chardev_without_path_outside_virtio_channels_is_refused() -> None:
    from vmconfine.errors import XMLError

    bad = DOMAIN.replace("<channel type='unix'><target type='virtio'/></channel>",
                         "<serial type='unix'><source mode='bind'/></serial>")
    with pytest.raises(XMLError, match="only virtio channels get a generated path"):
        parse_domain(bad)
