"""The display half of the QEMU command line (see :mod:`vmconfine.qemu.argv`): VNC, SPICE,
video devices, sound and its audio backend, USB redirection over SPICE.

Renderings follow libvirt 9.0's ``qemu_command.c`` (``qemuBuildGraphicsSPICECommandLine``,
checked with ``virsh domxml-to-native``):

- SPICE listens on a TCP address (``<listen type='address'>``, else qemu.conf
  ``spice_listen``, default 127.0.0.1) with its ports allocated at start from
  ``remote_display_port_min``..``remote_display_port_max`` (libvirt's port allocator: the
  first port no other domain holds and nothing is bound to; held until the domain stops:
  :mod:`vmconfine.launch.ports`), or on a unix socket (``unix=on,addr=PATH``);
- a VNC autoport on TCP gets its port from the same allocator at start (``-vnc HOST:N``, as
  libvirt's qemuProcessVNCAllocatePorts); a command line built without a start
  (``domxml-to-native``) leaves the choice to QEMU (``HOST:0,to=...``);
- a TLS port (``tls-port=`` + ``x509-dir=`` from ``spice_tls_x509_cert_dir``) only with
  ``spice_tls = 1``; a missing certificate directory is refused before QEMU starts;
- the password (``<graphics passwd>``, else qemu.conf ``spice_password``) is never on the
  command line: without one ``disable-ticketing=on``; with one, ticketing stays on (nobody can
  connect) until vmconfine sets it over the root-only QMP monitor (``set_password``), as
  libvirt 9 does;
- ``seamless-migration=on`` always, as libvirt;
- a ``spicevmc`` channel is the agent channel (``-chardev spicevmc,name=vdagent`` on a
  virtserialport), a ``<redirdev type='spicevmc'>`` a ``usb-redir`` device on a
  ``spicevmc`` chardev named ``usbredir``; both need a SPICE display.

QEMU 7.2's ``-spice`` takes no file descriptor (its options are ``unix``/``addr``; spice-server
binds the path itself), so unlike VNC and chardev sockets the SPICE unix socket is created by
QEMU. Its generated path is ``spice.sock`` in the domain's own home directory (libvirt's
``<libDir>/spice.sock``), which every driver already grants to this domain's QEMU alone; a path
given in the XML needs a directory QEMU may write (docs/domain-xml.md, "SPICE").
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmconfine.qemu.argv_devices import UnsupportedConfigError, to_json
from vmconfine.qemu.fdpass import QMP, Part, PassedFd, escape_opt

if TYPE_CHECKING:
    from vmconfine.domain import Domain, Graphics
    from vmconfine.domain.display import Video
    from vmconfine.qemu.argv_devices import Builder

#: <video><model type=...> → QEMU device
VIDEO_MODELS = {
    "vga": "VGA", "cirrus": "cirrus-vga", "vmvga": "vmware-svga", "qxl": "qxl-vga",
    "virtio": "virtio-vga", "bochs": "bochs-display", "ramfb": "ramfb",
}
#: <sound model=...> → (controller device, HDA codec or None)
SOUND_MODELS = {"ich6": ("intel-hda", "hda-duplex"), "ich9": ("ich9-intel-hda", "hda-duplex"),
                "ac97": ("AC97", None)}
#: <audio type=...> → QEMU audiodev driver
AUDIO_DRIVERS = {"spice": "spice", "none": "none"}
#: SPICE's QMP/argv names of libvirt's ``<image>``, ``<jpeg>``... elements
SPICE_OPTION_NAMES = {"image": "image-compression", "jpeg": "jpeg-wan-compression",
                      "zlib": "zlib-glz-wan-compression", "playback": "playback-compression",
                      "streaming": "streaming-video"}
SPICE_SOCKET_NAME = "spice.sock"
#: ``acquire(role) -> port``: a free display port for ``role`` ("spice", "spice-tls", "vnc")
Acquire = Callable[[str], int]


# --------------------------------------------------------------------------- VNC


def vnc_socket(domain: Domain, config: Any, runtime_dir: str) -> str | None:
    """The unix socket the VNC display listens on (``<graphics socket=>`` or, with
    ``vnc_auto_unix_socket = 1``, ``vnc.sock`` in the domain's runtime directory), or None."""
    g = next((x for x in domain.graphics if x.type == "vnc"), None)
    if g is None:
        return None
    if g.socket:
        return str(g.socket)
    if g.listen is None and g.listen_type is None and \
            getattr(config, "vnc_auto_unix_socket", False):
        return os.path.join(runtime_dir, "vnc.sock")
    return None


def vnc_listens_tcp(g: Graphics, config: Any) -> bool:
    """True when a VNC display listens on a TCP port (not a unix socket, not ``none``)."""
    if g.type != "vnc" or g.socket or g.listen_type in ("none", "socket"):
        return False
    return not (g.listen is None and g.listen_type is None and
                getattr(config, "vnc_auto_unix_socket", False))


def _host(listen: str) -> str:
    return f"[{listen}]" if ":" in listen and not listen.startswith("[") else listen


def _vnc_address(b: Builder, g: Graphics, runtime_dir: str) -> tuple[Part, ...]:
    socket_path = vnc_socket(b.domain, b.config, runtime_dir)
    if socket_path:
        return (PassedFd(QMP, socket_path, "vnc"),)
    if g.listen_type == "none":
        return ("none",)
    listen = g.listen
    if listen is None and g.listen_type is None:
        listen = getattr(b.config, "vnc_listen", "127.0.0.1")
    host = _host(listen or "127.0.0.1")
    if g.port is None or g.port <= 0:
        # an autoport not allocated (no start: domxml-to-native): QEMU would pick the first
        # free display from :0 (port 5900) up to port 65535
        addr = f"{host}:0,to={65535 - 5900}"
    else:
        if g.port < 5900:
            raise UnsupportedConfigError(
                f"VNC port {g.port} is below 5900; use a port from 5900 or autoport='yes'"
            )
        addr = f"{host}:{g.port - 5900}"
    if g.websocket is not None and g.websocket != 0:
        addr += ",websocket=" + ("on" if g.websocket < 0 else str(g.websocket))
    return (addr,)


# --------------------------------------------------------------------------- SPICE


def spice_graphics(domain: Domain) -> Graphics | None:
    """The domain's SPICE display, or None."""
    return next((g for g in domain.graphics if g.type == "spice"), None)


def fill_spice_socket(domain: Domain, home_dir: str, auto_unix_socket: bool) -> None:
    """Give a SPICE display that listens on a unix socket without a path (``<listen
    type='socket'/>``, or no address with ``spice_auto_unix_socket = 1``) libvirt's generated
    path, ``<home>/spice.sock``; shown in the live XML, left out of the inactive one."""
    g = spice_graphics(domain)
    if g is None or g.socket:
        return
    wants_socket = g.listen_type == "socket" or (
        auto_unix_socket and g.listen_type in (None, "address") and g.listen is None)
    if not wants_socket:
        return
    path = os.path.join(home_dir, SPICE_SOCKET_NAME)
    g.socket, g.listen_type, g.socket_generated = path, "socket", True
    listen = next((c for c in g.element if c.tag == "listen"), None) \
        if g.element is not None else None
    if listen is not None and listen.get("type") == "socket":
        listen.set("socket", path)
        domain.generated_paths.append(path)


def spice_password(domain: Domain, config: Any) -> str | None:
    """The SPICE ticket: ``<graphics passwd>``, else qemu.conf ``spice_password``."""
    g = spice_graphics(domain)
    if g is None or g.spice is None:
        return None
    return g.spice.passwd if g.spice.passwd is not None else \
        getattr(config, "spice_password", None)


def _needs(g: Graphics, config: Any) -> tuple[bool, bool]:
    """(plain port, TLS port) an autoport display needs (qemuProcessSPICEAllocatePorts)."""
    assert g.spice is not None
    tls_on = bool(getattr(config, "spice_tls", False))
    need_port = need_tls = False
    for mode in (g.spice.default_mode, *g.spice.channels.values()):
        if mode == "secure":
            need_tls = True
        elif mode == "insecure":
            need_port = True
        else:
            need_port = True
            need_tls = need_tls or tls_on
    return need_port, need_tls


def port_is_free(port: int) -> bool:
    """libvirt's virPortAllocatorBindToPort: the port can be bound on every IPv4 and IPv6
    address (with SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                continue
            raise
        with contextlib.closing(s):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
    return True


def display_port_range(config: Any) -> range:
    """``remote_display_port_min``..``remote_display_port_max``, the ports displays get."""
    low = int(getattr(config, "remote_display_port_min", 5900))
    high = int(getattr(config, "remote_display_port_max", 65535))
    if low > high:
        raise UnsupportedConfigError(
            "remote_display_port_min: min port must not be greater than max port; fix "
            "qemu.conf")
    return range(low, high + 1)


def no_free_port(ports: range) -> UnsupportedConfigError:
    """libvirt's error when the display range is exhausted."""
    return UnsupportedConfigError(
        f"Unable to find an unused port in range 'display' ({ports.start}-{ports.stop - 1}); "
        "free a port or widen remote_display_port_min/remote_display_port_max")


def probe_acquire(config: Any) -> Acquire:
    """Ports chosen by probing alone, nothing reserved (a command line only printed:
    ``domxml-to-native``, the report); a start reserves them (:mod:`vmconfine.launch.ports`)."""
    taken: set[int] = set()

    def acquire(_role: str) -> int:
        ports = display_port_range(config)
        for port in ports:
            if port not in taken and port_is_free(port):
                taken.add(port)
                return port
        raise no_free_port(ports)

    return acquire


def allocate_spice_ports(domain: Domain, config: Any, acquire: Acquire | None = None) -> None:
    """Allocate the SPICE display's ports (autoport, or ``tlsPort='-1'``) as libvirt does at
    start, and write them into the tree (the live XML shows them). ``acquire``: where ports
    come from (default: probing only, nothing reserved)."""
    g = spice_graphics(domain)
    if g is None or g.spice is None or g.socket or g.listen_type in ("socket", "none"):
        return
    acquire = acquire or probe_acquire(config)
    need_port, need_tls = _needs(g, config) if g.autoport else (False, False)
    if g.autoport and g.element is not None:
        g.element.set("autoport", "yes")  # as libvirt's live XML; the ports are dropped from
        # the inactive XML (vmconfine.domain.display.drop_allocated_ports)
    tls_on = bool(getattr(config, "spice_tls", False))
    if need_port and (g.port is None or g.port <= 0):
        g.port = acquire("spice")
        if g.element is not None:
            g.element.set("port", str(g.port))
    tls = g.spice.tls_port
    if (need_tls and (tls is None or tls <= 0)) or tls == -1:
        if not tls_on:
            raise UnsupportedConfigError(
                "Auto allocation of spice TLS port requested but spice TLS is disabled in "
                "qemu.conf; set spice_tls = 1 or remove tlsPort / the secure channels")
        g.spice.tls_port = acquire("spice-tls")
        if g.element is not None:
            g.element.set("tlsPort", str(g.spice.tls_port))


def allocate_vnc_port(domain: Domain, config: Any, acquire: Acquire) -> None:
    """The VNC autoport on TCP from ``acquire`` (libvirt's qemuProcessVNCAllocatePorts),
    written into the tree (the live XML shows it; the inactive one has ``port='-1'``)."""
    g = next((x for x in domain.graphics if x.type == "vnc"), None)
    if g is None or not g.autoport or (g.port or 0) > 0 or not vnc_listens_tcp(g, config):
        return
    g.port = acquire("vnc")
    if g.element is not None:
        g.element.set("autoport", "yes")
        g.element.set("port", str(g.port))


def fixed_display_ports(domain: Domain, config: Any) -> list[tuple[str, int]]:
    """(role, port) of every TCP port a display names itself (libvirt's
    qemuProcessGraphicsReservePorts): marked used at start, so no autoport takes them."""
    out: list[tuple[str, int]] = []
    for g in domain.graphics:
        if g.type == "vnc" and g.websocket is not None and g.websocket > 0:
            out.append(("vnc-websocket", g.websocket))
        if g.autoport:
            continue
        if g.type == "vnc" and vnc_listens_tcp(g, config) and g.port and g.port > 0:
            out.append(("vnc", g.port))
        elif g.type == "spice" and g.spice is not None and not g.socket and \
                g.listen_type not in ("socket", "none"):
            out += [(role, p) for role, p in (("spice", g.port), ("spice-tls", g.spice.tls_port))
                    if p is not None and p > 0]
    return out


def _spice_option(b: Builder, g: Graphics) -> str:
    sp = g.spice
    assert sp is not None
    cfg = b.config
    opts: list[str] = []
    secure = False
    if g.socket:
        opts.append(f"unix=on,addr={escape_opt(g.socket)}")
    elif g.listen_type == "none":
        opts.append("port=0")  # libvirt: QEMU wants a port or tls-port
    elif g.listen_type == "network":
        raise UnsupportedConfigError(
            "SPICE <listen type='network'> is not supported (vmconfine has no virtual "
            "networks); use <listen type='address' address='...'/> or type='socket'")
    else:
        port = g.port if g.port is not None and g.port > 0 else 0
        tls = sp.tls_port if sp.tls_port is not None and sp.tls_port > 0 else 0
        if port:
            opts.append(f"port={port}")
        if tls:
            if not getattr(cfg, "spice_tls", False):
                raise UnsupportedConfigError(
                    "Spice TLS port set in XML configuration, but TLS is disabled in qemu.conf;"
                    " set spice_tls = 1 or remove tlsPort")
            opts.append(f"tls-port={tls}")
            secure = True
        if not port and not tls:
            raise UnsupportedConfigError(
                "the SPICE display has no port: give port=, tlsPort= or autoport='yes', or "
                "listen on a socket")
        listen = g.listen if g.listen is not None else getattr(cfg, "spice_listen", None)
        if listen:
            opts.append(f"addr={escape_opt(listen)}")
    if getattr(cfg, "spice_sasl", False):
        raise UnsupportedConfigError(
            "spice_sasl = 1 is not implemented by vmconfine; set spice_sasl = 0 and use a "
            "password (spice_password or <graphics passwd>) or TLS")
    if spice_password(b.domain, cfg) is None:
        opts.append("disable-ticketing=on")
    if secure:
        cert_dir = str(getattr(cfg, "spice_tls_x509_cert_dir", "/etc/pki/qemu"))
        if not os.path.isdir(cert_dir):
            raise UnsupportedConfigError(
                f"spice_tls_x509_cert_dir directory '{cert_dir}' does not exist; create it "
                "with ca-cert.pem, server-cert.pem and server-key.pem, or set spice_tls = 0")
        opts.append(f"x509-dir={escape_opt(cert_dir)}")
    if sp.default_mode == "secure":
        opts.append("tls-channel=default")
    elif sp.default_mode == "insecure":
        opts.append("plaintext-channel=default")
    for name, mode in sp.channels.items():
        if mode == "secure":
            opts.append(f"tls-channel={name}")
        elif mode == "insecure":
            opts.append(f"plaintext-channel={name}")
    for tag, qemu_name in SPICE_OPTION_NAMES.items():
        if tag in sp.settings:
            opts.append(f"{qemu_name}={sp.settings[tag]}")
    if "mouse" in sp.settings:
        opts.append("agent-mouse=" + ("on" if sp.settings["mouse"] == "client" else "off"))
    if sp.copypaste is False:
        opts.append("disable-copy-paste=on")
    if sp.filetransfer is False:
        opts.append("disable-agent-file-xfer=on")
    if sp.gl:
        raise UnsupportedConfigError(
            "SPICE OpenGL (<gl enable='yes'>) is not supported (it needs a host render node); "
            "use <gl enable='no'/>")
    opts.append("seamless-migration=on")
    return ",".join(opts)


def spice_cert_dir(domain: Domain, config: Any) -> str | None:
    """The x509 directory QEMU reads for the SPICE display's TLS port, or None."""
    g = spice_graphics(domain)
    if g is None or g.spice is None or g.socket or not getattr(config, "spice_tls", False):
        return None
    tls = g.spice.tls_port
    return str(getattr(config, "spice_tls_x509_cert_dir", "/etc/pki/qemu")) \
        if tls is not None and tls != 0 else None


# --------------------------------------------------------------------------- video, sound


def _video_device(video: Video, index: int) -> dict[str, Any]:
    qdev = VIDEO_MODELS.get(video.model)
    if qdev is None:
        raise UnsupportedConfigError(
            f"video model '{video.model}' is not supported; use one of "
            f"{', '.join(sorted(VIDEO_MODELS))} or 'none'")
    if index > 0 and qdev == "virtio-vga":
        qdev = "virtio-gpu-pci"
    elif index > 0 and qdev == "qxl-vga":
        qdev = "qxl"
    elif index > 0:
        raise UnsupportedConfigError(f"secondary video model '{video.model}' is not supported")
    props: dict[str, Any] = {"driver": qdev, "id": f"video{index}"}
    if video.model == "qxl":
        assert video.ram is not None and video.vram is not None and video.vgamem is not None
        props.update({"max_outputs": video.heads or 1, "ram_size": video.ram * 1024,
                      "vram_size": video.vram * 1024, "vram64_size_mb": (video.vram64 or 0)
                      // 1024, "vgamem_mb": video.vgamem // 1024})
    return props


def add_video(b: Builder) -> None:
    """The video devices (the primary first; cirrus for a graphical guest without one)."""
    videos = [v for v in b.domain.videos if v.model != "none"]
    videos.sort(key=lambda v: not v.primary)
    if not videos and b.domain.graphics and not b.domain.videos:
        b.device({"driver": "cirrus-vga", "id": "video0"})  # libvirt's implicit x86 video
        return
    for i, video in enumerate(videos):
        b.device(_video_device(video, i))


def _audio_backends(domain: Domain) -> list[tuple[int, str]]:
    """(id, type) of each audio backend; libvirt adds one for a guest with sound devices and
    none declared: 'spice' when the first display is SPICE, else 'none'."""
    if domain.audios:
        return [(a.id, a.type) for a in domain.audios]
    if not domain.sounds:
        return []
    first = domain.graphics[0].type if domain.graphics else None
    return [(1, "spice" if first == "spice" else "none")]


def add_audio(b: Builder) -> None:
    """``-audiodev`` for every audio backend."""
    for audio_id, atype in _audio_backends(b.domain):
        driver = AUDIO_DRIVERS.get(atype)
        if driver is None:
            raise UnsupportedConfigError(
                f"<audio type='{atype}'> is not supported; use type='spice' or type='none'")
        if driver == "spice" and spice_graphics(b.domain) is None:
            raise UnsupportedConfigError(
                "<audio type='spice'> needs a <graphics type='spice'> display")
        b.add("-audiodev", to_json({"id": f"audio{audio_id}", "driver": driver}))


def add_sound(b: Builder) -> None:
    """Sound cards, each playing to its ``<audio id>`` (the first backend by default)."""
    backends = [i for i, _ in _audio_backends(b.domain)]
    for n, sound in enumerate(b.domain.sounds):
        model = SOUND_MODELS.get(sound.model)
        if model is None:
            raise UnsupportedConfigError(
                f"sound model '{sound.model}' is not supported; use ich6, ich9 or ac97")
        audio = sound.audio if sound.audio is not None else backends[0]
        if audio not in backends:
            raise UnsupportedConfigError(
                f"<sound> plays to <audio id='{audio}'>, which the domain does not have")
        controller, codec = model
        alias = f"sound{n}"
        props: dict[str, Any] = {"driver": controller, "id": alias}
        if codec is None:
            props["audiodev"] = f"audio{audio}"
            b.device(props, sound.element)
            continue
        b.device(props, sound.element)
        b.device({"driver": codec, "id": f"{alias}-codec0", "bus": f"{alias}.0", "cad": 0,
                  "audiodev": f"audio{audio}"})


def add_redirdevs(b: Builder) -> None:
    """USB redirection over SPICE: a ``usbredir`` spicevmc chardev and a ``usb-redir``."""
    for n, redir in enumerate(b.domain.redirdevs):
        if redir.bus != "usb" or redir.type != "spicevmc":
            raise UnsupportedConfigError(
                f"<redirdev bus='{redir.bus}' type='{redir.type}'> is not supported; use "
                "bus='usb' type='spicevmc'")
        if b.usb_bus is None:
            raise UnsupportedConfigError(
                "<redirdev> needs a USB controller, but the USB controller model is 'none'")
        alias = f"redir{n}"
        b.add("-chardev", f"spicevmc,id=char{alias},name=usbredir")
        b.device({"driver": "usb-redir", "chardev": f"char{alias}", "id": alias,
                  "bus": b.usb_bus})


def _check_spice_users(domain: Domain) -> None:
    if spice_graphics(domain) is not None:
        return
    if any(c.type == "spicevmc" for c in domain.chardevs):
        raise UnsupportedConfigError(
            "a <channel type='spicevmc'> needs a <graphics type='spice'> display")
    if domain.redirdevs:
        raise UnsupportedConfigError(
            "<redirdev type='spicevmc'> needs a <graphics type='spice'> display")


def add_graphics(b: Builder, runtime_dir: str) -> None:
    """Audio backends, the displays (``-vnc``, ``-spice``), video, sound, USB redirection."""
    domain = b.domain
    kinds = [g.type for g in domain.graphics]
    for t in kinds:
        if t not in ("vnc", "spice"):
            raise UnsupportedConfigError(
                f"graphics type '{t}' is not supported; use type='vnc', type='spice' or no "
                "<graphics>")
        if kinds.count(t) > 1:
            raise UnsupportedConfigError(f"only one <graphics type='{t}'> is supported")
    _check_spice_users(domain)
    add_audio(b)
    for g in domain.graphics:
        if g.type == "vnc":
            b.add_passed("-vnc", _vnc_address(b, g, runtime_dir))
        else:
            if g.spice is not None and g.autoport and not g.socket and \
                    g.listen_type not in ("socket", "none") and (g.port or 0) <= 0:
                allocate_spice_ports(domain, b.config)
            b.add("-spice", _spice_option(b, g))
        if g.keymap:
            b.add("-k", g.keymap)
    add_video(b)
    add_sound(b)
    add_redirdevs(b)
