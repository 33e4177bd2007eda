"""The virt-install corpus (tests/data/virtinstall/): domain XMLs shaped as virt-install 4.x
writes them, and the one place that says which of them wait for a feature still being built
(``waiting.json``).

A domain is given to the tests as it is, with two documented changes for this host:

- ``/var/lib/libvirt/images`` and ``/var/lib/libvirt/boot`` become the test's scratch
  directory (where the images, ISOs, kernel and logs are created);
- ``type="kvm"`` becomes ``type="qemu"`` and virt-install's ``<cpu mode="host-passthrough"
  ...>`` becomes a plain ``<cpu>`` (its ``<topology>`` kept): guests here run under TCG, where
  host-passthrough is refused by libvirt and vmconfine alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "virtinstall"
CASES = sorted(p.stem for p in DATA.glob("*.xml"))
_WAITING = json.loads((DATA / "waiting.json").read_text())
#: feature → {"issue", "what", "error"}: what a waiting domain needs
FEATURES: dict[str, dict[str, object]] = _WAITING["features"]
#: domain → the features it waits for
WAITING: dict[str, list[str]] = _WAITING["domains"]
READY = [c for c in CASES if c not in WAITING]

IMAGE_DIRS = ("/var/lib/libvirt/images", "/var/lib/libvirt/boot")
_PASSTHROUGH = re.compile(r'<cpu mode="host-passthrough"[^>/]*(/?)>')


def text(case: str) -> str:
    return (DATA / f"{case}.xml").read_text()


def for_host(xml: str, scratch: Path) -> str:
    """The corpus XML with the two changes of the module docstring."""
    for d in IMAGE_DIRS:
        xml = xml.replace(d, str(scratch))
    xml = xml.replace('<domain type="kvm">', '<domain type="qemu">')
    return _PASSTHROUGH.sub(lambda m: "" if m.group(1) else "<cpu>", xml)


def without_interfaces(xml: str) -> str:
    """For libvirt's ``domxml-to-native``, which turns every NIC into a tap device (needs
    /dev/net/tun), as tests/host/test_argv_libvirt.py does."""
    return re.sub(r"\s*<interface\b.*?</interface>", "", xml, flags=re.S)
