"""SPICE as virt-install writes it: domain XML → QEMU command line, the resources every driver
sees, the Landlock ports, the qemu.conf keys. Real QEMU and libvirt's own command line:
tests/host/test_spice.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmconfine.config.settings import QemuConfig, config_from_text
from vmconfine.domain import parse_domain
from vmconfine.domain.support import unsupported
from vmconfine.errors import ConfigError
from vmconfine.plugin.resources import Role, domain_resources
from vmconfine.qemu import argv_display
from vmconfine.qemu.argv import CommandPaths, UnsupportedConfigError, build_command
from vmconfine.qemu.argv_display import allocate_spice_ports, fill_spice_socket
from vmconfine_landlock.ruleset import derive_ruleset

PATHS = CommandPaths(monitor_socket="/run/x/monitor.sock", home_dir="/var/lib/x/domain-sp",
                     runtime_dir="/run/x", user="qemu")
BASE = """<domain type='qemu'>
  <name>sp</name>
  <uuid>0b8e2f4c-7f2e-4bb0-9d1a-3f1f0c9e5a12</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='qemu-xhci'/>
    {devices}
  </devices>
</domain>
"""
REAL_PORT_IS_FREE = argv_display.port_is_free
#: what virt-install 4 writes for --graphics spice (q35, linux guest)
VIRT_INSTALL = """
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='spice' autoport='yes'>
      <listen type='address'/>
      <image compression='off'/>
    </graphics>
    <sound model='ich9'/>
    <audio id='1' type='spice'/>
    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'
                  primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <redirdev bus='usb' type='spicevmc'/>
"""


@pytest.fixture(autouse=True)
def free_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Port probing without the host: ports listed here are taken."""
    taken: list[int] = []
    monkeypatch.setattr(argv_display, "port_is_free", lambda port: port not in taken)
    return taken


def domain(devices: str):  # type: ignore[no-untyped-def]
    return parse_domain(BASE.format(devices=devices), "sp.xml")


def args(devices: str, config: QemuConfig | None = None) -> list[str]:
    dom = domain(devices)
    cfg = config or QemuConfig()
    fill_spice_socket(dom, PATHS.home_dir, cfg.spice_auto_unix_socket)
    return build_command(dom, cfg, PATHS).args


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def spice(argv: list[str]) -> dict[str, str]:
    (value,) = option(argv, "-spice")
    return dict(p.split("=", 1) for p in value.split(","))


def test_virt_install_spice_is_implemented_and_built_as_libvirt() -> None:
    assert unsupported(domain(VIRT_INSTALL)) == []
    argv = args(VIRT_INSTALL)
    assert spice(argv) == {"port": "5900", "addr": "127.0.0.1", "disable-ticketing": "on",
                           "image-compression": "off", "seamless-migration": "on"}
    devices = option(argv, "-device")
    assert ('{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":'
            '"charchannel0","id":"channel0","name":"com.redhat.spice.0"}') in devices
    assert ('{"driver":"qxl-vga","id":"video0","max_outputs":1,"ram_size":67108864,'
            '"vram_size":67108864,"vram64_size_mb":0,"vgamem_mb":16,"bus":"pcie.0",'
            '"addr":"0x1"}') in devices
    assert '{"driver":"ich9-intel-hda","id":"sound0","bus":"pcie.0","addr":"0x1b"}' in devices
    assert ('{"driver":"hda-duplex","id":"sound0-codec0","bus":"sound0.0","cad":0,'
            '"audiodev":"audio1"}') in devices
    assert ('{"driver":"usb-redir","chardev":"charredir1","id":"redir1","bus":"usb.0"}'
            in devices)
    assert option(argv, "-chardev")[-3:] == ["spicevmc,id=charchannel0,name=vdagent",
                                             "spicevmc,id=charredir0,name=usbredir",
                                             "spicevmc,id=charredir1,name=usbredir"]
    assert option(argv, "-audiodev") == ['{"id":"audio1","driver":"spice"}']


def test_autoport_takes_the_first_free_port_of_the_range(free_ports: list[int]) -> None:
    free_ports += [5900, 5901]
    cfg = config_from_text("remote_display_port_min = 5900\nspice_tls = 1\n", "q.conf",
                           privileged=True, caller_uid=0, caller_gid=0)
    cfg.spice_tls_x509_cert_dir = "/"  # exists
    dom = domain(VIRT_INSTALL)
    allocate_spice_ports(dom, cfg)
    g = dom.graphics[0]
    assert (g.port, g.spice.tls_port) == (5902, 5903)  # type: ignore[union-attr]
    live = dom.to_xml(live=True)
    assert "port=\"5902\"" in live and "tlsPort=\"5903\"" in live
    assert "5902" not in dom.to_xml() and "5903" not in dom.to_xml()  # allocated again
    opts = spice(build_command(dom, cfg, PATHS).args)
    assert (opts["port"], opts["tls-port"], opts["x509-dir"]) == ("5902", "5903", "/")
    # the allocated ports are the only TCP ports Landlock lets QEMU bind
    rules = derive_ruleset(dom, [], None)
    assert {n.port for n in rules.net_rules} == {5902, 5903}
    assert "bind_tcp" in rules.handled_net


def test_an_implied_autoport_stays_one_in_the_inactive_xml() -> None:
    dom = domain("<graphics type='spice'/>")
    allocate_spice_ports(dom, QemuConfig())
    assert dom.graphics[0].port == 5900 and 'port="5900"' in dom.to_xml(live=True)
    again = parse_domain(dom.to_xml(), "sp.xml")
    assert (again.graphics[0].port, again.graphics[0].autoport) == (-1, True)


def test_no_free_port_and_a_bad_range_are_one_line(free_ports: list[int]) -> None:
    cfg = QemuConfig(remote_display_port_min=5900, remote_display_port_max=5901)
    free_ports += [5900, 5901]
    with pytest.raises(UnsupportedConfigError, match=r"unused port in range 'display' "
                                                     r"\(5900-5901\)"):
        args(VIRT_INSTALL, cfg)
    with pytest.raises(UnsupportedConfigError, match="min port must not be greater"):
        args(VIRT_INSTALL, QemuConfig(remote_display_port_min=6000,
                                      remote_display_port_max=5999))
    for bad in ("remote_display_port_min = 5899", "remote_display_port_max = 65536"):
        with pytest.raises(ConfigError, match="remote_display_port_m"):
            config_from_text(bad, "q.conf", privileged=True, caller_uid=0, caller_gid=0)


def test_port_probe_sees_a_listening_port() -> None:
    """libvirt's probe binds the wildcard address: a listener on 127.0.0.1 makes it taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert REAL_PORT_IS_FREE(port) is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: still taken for the wildcard bind
        assert REAL_PORT_IS_FREE(s.getsockname()[1]) is False


def test_unix_socket_generated_in_the_domain_home_and_left_out_of_inactive_xml() -> None:
    dom = domain("<graphics type='spice'><listen type='socket'/></graphics>")
    dom.generated_paths = []
    fill_spice_socket(dom, PATHS.home_dir, False)
    path = f"{PATHS.home_dir}/spice.sock"
    assert spice(build_command(dom, QemuConfig(), PATHS).args) == {
        "unix": "on", "addr": path, "disable-ticketing": "on", "seamless-migration": "on"}
    assert f'socket="{path}"' in dom.to_xml(live=True)
    assert path not in dom.to_xml()
    # in QEMU's home: covered by the home directory every driver grants, no resource of its own
    res = domain_resources(dom, None, Path(PATHS.home_dir))
    assert [r for r in res if r.role == Role.GRAPHICS] == []
    # spice_auto_unix_socket: a display without an address gets the same socket
    auto = args("<graphics type='spice'/>", QemuConfig(spice_auto_unix_socket=True))
    assert spice(auto)["addr"] == path


def test_a_socket_path_of_the_xml_is_created_by_qemu_in_its_directory(tmp_path: Path) -> None:
    sock = tmp_path / "sp.sock"
    dom = domain(f"<graphics type='spice'><listen type='socket' socket='{sock}'/></graphics>")
    assert spice(build_command(dom, QemuConfig(), PATHS).args)["addr"] == str(sock)
    (res,) = [r for r in domain_resources(dom, None, Path(PATHS.home_dir))
              if r.role == Role.GRAPHICS]
    assert (res.path, res.access, res.create, res.passed) == (str(sock), "rw", True, None)
    rules = derive_ruleset(dom, [res], None)
    (rule,) = rules.path_rules
    assert (rule.path, rule.access, rule.is_dir) == (str(tmp_path), frozenset({"make_sock"}),
                                                     True)


def test_password_is_never_on_the_command_line() -> None:
    argv = args(VIRT_INSTALL.replace("autoport='yes'", "autoport='yes' passwd='xyzzy-pw'"))
    assert "disable-ticketing" not in spice(argv)  # ticketing stays on until QMP sets it
    assert not any("xyzzy" in a for a in argv)
    argv = args(VIRT_INSTALL, QemuConfig(spice_password="conf-pw"))
    assert "disable-ticketing" not in spice(argv) and not any("conf-pw" in a for a in argv)
    shown = QemuConfig(spice_password="conf-pw").format()
    assert "conf-pw" not in shown and "#spice_password = (set, not shown)" in shown


def test_tls_needs_spice_tls_and_an_existing_certificate_dir(tmp_path: Path) -> None:
    fixed = VIRT_INSTALL.replace("autoport='yes'", "port='5910' tlsPort='5911'")
    with pytest.raises(UnsupportedConfigError, match=r"TLS is disabled in qemu\.conf"):
        args(fixed)
    missing = tmp_path / "nope"
    with pytest.raises(UnsupportedConfigError,
                       match=f"spice_tls_x509_cert_dir directory '{missing}' does not exist"):
        args(fixed, QemuConfig(spice_tls=True, spice_tls_x509_cert_dir=str(missing)))
    opts = spice(args(fixed, QemuConfig(spice_tls=True, spice_tls_x509_cert_dir=str(tmp_path))))
    assert (opts["port"], opts["tls-port"], opts["x509-dir"]) == ("5910", "5911", str(tmp_path))
    dom = domain(fixed)
    res = domain_resources(dom, None, None, spice_x509_dir=str(tmp_path))
    assert [(r.path, r.access, r.is_dir) for r in res if r.role == Role.GRAPHICS] == [
        (str(tmp_path), "ro", True)]


def test_spice_settings_of_the_xml() -> None:
    text = ("<graphics type='spice' port='5905' defaultMode='secure'>"
            "<channel name='main' mode='insecure'/><image compression='auto_glz'/>"
            "<jpeg compression='never'/><zlib compression='always'/>"
            "<playback compression='off'/><streaming mode='all'/><mouse mode='client'/>"
            "<clipboard copypaste='no'/><filetransfer enable='no'/><gl enable='no'/>"
            "</graphics>")
    assert unsupported(domain(text)) == []
    opts = args(text)[args(text).index("-spice") + 1].split(",")
    assert opts == ["port=5905", "addr=127.0.0.1", "disable-ticketing=on",
                    "tls-channel=default", "plaintext-channel=main",
                    "image-compression=auto_glz", "jpeg-wan-compression=never",
                    "zlib-glz-wan-compression=always", "playback-compression=off",
                    "streaming-video=all", "agent-mouse=on", "disable-copy-paste=on",
                    "disable-agent-file-xfer=on", "seamless-migration=on"]


@pytest.mark.parametrize(("devices", "message"), [
    ("<graphics type='spice'><gl enable='yes'/></graphics>", "OpenGL"),
    ("<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
     "needs a <graphics type='spice'>"),
    ("<redirdev bus='usb' type='spicevmc'/>", "needs a <graphics type='spice'>"),
    ("<graphics type='spice' autoport='yes'/><channel type='spicevmc'>"
     "<target type='virtio' name='org.example'/></channel>", "SPICE agent channel"),
    ("<graphics type='spice' autoport='yes'/><graphics type='spice' autoport='yes'/>",
     "only one <graphics type='spice'>"),
    ("<graphics type='spice'><listen type='network' network='default'/></graphics>",
     "listen type='network'"),
    ("<graphics type='spice' autoport='no'/>", "has no port"),
    ("<sound model='ich9'/><audio id='1' type='pulseaudio'/>", "type='pulseaudio'"),
    ("<graphics type='vnc'/><sound model='ich9'/><audio id='1' type='spice'/>",
     "needs a <graphics type='spice'>"),
    ("<sound model='ich6'><audio id='2'/></sound><audio id='1' type='none'/>",
     "<audio id='2'>"),
])
def test_what_cannot_run_is_refused_in_one_line(devices: str, message: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=message) as err:
        args(devices)
    assert "\n" not in str(err.value)


def test_sasl_is_refused() -> None:
    with pytest.raises(UnsupportedConfigError, match="spice_sasl = 1 is not implemented"):
        args(VIRT_INSTALL, QemuConfig(spice_sasl=True))


def test_sound_gets_libvirts_default_audio_backend() -> None:
    spice_sound = args("<graphics type='spice' autoport='yes'/><sound model='ac97'/>")
    assert option(spice_sound, "-audiodev") == ['{"id":"audio1","driver":"spice"}']
    # conventional PCI sound cards go behind the pcie-to-pci-bridge, as libvirt places them
    assert ('{"driver":"AC97","id":"sound0","audiodev":"audio1","bus":"pci.2","addr":"0x1"}'
            in option(spice_sound, "-device"))
    headless = args("<sound model='ich6'/>")
    assert option(headless, "-audiodev") == ['{"id":"audio1","driver":"none"}']
    assert ('{"driver":"intel-hda","id":"sound0","bus":"pci.2","addr":"0x1"}'
            in option(headless, "-device"))


def test_spice_settings_on_vnc_are_reported() -> None:
    found = unsupported(domain("<graphics type='vnc' passwd='x'><clipboard copypaste='no'/>"
                               "</graphics>"))
    assert [f.what for f in found] == ["attribute passwd= of <devices/graphics>",
                                      "<devices/graphics/clipboard>"]


def test_bad_values_are_refused_when_read() -> None:
    for text, message in (
            ("<graphics type='spice'><image compression='zip'/></graphics>",
             "unknown spice image compression 'zip'"),
            ("<graphics type='spice' defaultMode='maybe'/>", "unknown spice defaultMode"),
            ("<graphics type='spice'><channel name='main'/></graphics>", "needs name= and"),
            ("<graphics type='spice' tlsPort='70000'/>", "tlsPort must be in range"),
            ("<video><model type='qxl' heads='0'/></video>", "heads must be 1 or more"),
            ("<audio type='spice'/>", "needs an id")):
        with pytest.raises(Exception, match=message):
            domain(text)


def test_keymap_is_given_to_qemu() -> None:
    for display in ("<graphics type='spice' autoport='yes' keymap='de'/>",
                    "<graphics type='vnc' keymap='de'/>"):
        assert unsupported(domain(display)) == []
        assert option(args(display), "-k") == ["de"]
