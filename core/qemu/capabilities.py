"""libvirt-style capabilities XML: the host, one <secmodel> per stacked driver, the guests."""

from __future__ import annotations

import grp
import os
import platform
import pwd
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

if TYPE_CHECKING:
    from vmconfine.launch.connection import Connection

#: The seed's emulator names, plus the x86 ones modern distributions ship.
EMULATOR_ARCH = {
    "qemu": "i686",
    "qemu-system-i386": "i686",
    "qemu-system-x86_64": "x86_64",
    "qemu-system-microblaze": "microblaze",
    "qemu-system-microblazeel": "microblazeel",
    "qemu-system-mips": "mips",
    "qemu-system-mipsel": "mipsel",
    "qemu-system-sparc": "sparc",
    "qemu-system-ppc": "ppc",
    "qemu-system-aarch64": "aarch64",
    "qemu-kvm": "x86_64",
}
WORDSIZE = {"x86_64": 64, "aarch64": 64, "i686": 32}


def host_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def find_emulators(search_path: list[str]) -> list[tuple[str, str]]:
    """(path, arch) for each known emulator binary found in ``search_path``."""
    found = []
    for name, arch in EMULATOR_ARCH.items():
        for d in search_path:
            p = Path(d) / name
            if p.is_file() and os.access(p, os.X_OK):
                found.append((str(p), arch))
                break
    return found


def kvm_usable(conn: Connection) -> bool:
    """Can the account QEMU runs as open /dev/kvm read-write?"""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    if not conn.instance.privileged:
        return os.access("/dev/kvm", os.R_OK | os.W_OK)
    cfg = conn.instance.config
    try:
        uid = int(cfg.user[1:]) if cfg.user.startswith("+") else pwd.getpwnam(cfg.user).pw_uid
        gid = int(cfg.group[1:]) if cfg.group.startswith("+") else grp.getgrnam(cfg.group).gr_gid
    except (KeyError, ValueError):
        return False
    groups = {gid}
    if not cfg.user.startswith("+"):
        groups.update(os.getgrouplist(cfg.user, gid))
    if uid == 0 and not cfg.clear_emulator_capabilities:
        return True
    mode = st.st_mode
    if st.st_uid == uid:
        return mode & 0o600 == 0o600
    if st.st_gid in groups:
        return mode & 0o060 == 0o060
    return mode & 0o006 == 0o006


def capabilities_xml(conn: Connection) -> str:
    root = etree.Element("capabilities")
    host = etree.SubElement(root, "host")
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
        m = machine_id
        uuid = f"{m[:8]}-{m[8:12]}-{m[12:16]}-{m[16:20]}-{m[20:32]}"
        etree.SubElement(host, "uuid").text = uuid
    except (OSError, IndexError):
        pass
    cpu = etree.SubElement(host, "cpu")
    etree.SubElement(cpu, "arch").text = host_arch()
    for sm in conn.stack.secmodels():
        sec = etree.SubElement(host, "secmodel")
        etree.SubElement(sec, "model").text = sm["model"]
        etree.SubElement(sec, "doi").text = sm["doi"]
        for vt in ("kvm", "qemu"):
            label = sm["baselabels"].get(vt)
            if label:
                bl = etree.SubElement(sec, "baselabel", type=vt)
                bl.text = label
    kvm = kvm_usable(conn)
    harch = host_arch()
    for path, arch in find_emulators(list(conn.instance.config.emulator_search_path)):
        guest = etree.SubElement(root, "guest")
        etree.SubElement(guest, "os_type").text = "hvm"
        a = etree.SubElement(guest, "arch", name=arch)
        if arch in WORDSIZE:
            etree.SubElement(a, "wordsize").text = str(WORDSIZE[arch])
        etree.SubElement(a, "emulator").text = path
        etree.SubElement(a, "domain", type="qemu")
        if kvm and (arch == harch or (harch == "x86_64" and arch == "i686")):
            etree.SubElement(a, "domain", type="kvm")
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"
