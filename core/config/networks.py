"""Network definitions: what ``<interface type='network'>`` attaches to.

vmconfine runs no virtual-network daemon. A network is a libvirt network XML file
``NAME.xml`` in the instance's networks directory
(:attr:`vmconfine.config.instance.Instance.networks_dir`: ``/etc/vmconfine/qemu/networks``
for ``qemu:///system``, ``ROOT/etc/qemu/networks`` for ``qemu:///embed?root=ROOT``), and
vmconfine reads ``<bridge name='...'/>``, the existing Linux bridge the guest's tap joins
(created by the admin, systemd-networkd, ifupdown, or libvirt's own network driver for
``virbr0``), or, for a macvtap network (``<forward mode='bridge|vepa|private|passthrough'>``
with ``<interface dev='eth0'/>`` and no bridge), the device and mode of the guest's macvtap
link (the first ``<interface>``, as libvirt when none is in use). An interface that names a
network without a definition is an error naming it: never a silent fall back to user-mode
networking.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.domain.interface import DIRECT_MODES
from vmconfine.domain.xml import child, one_line, safe_tree
from vmconfine.errors import ConfigError
from vmconfine.inputs import MAX_INPUT

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain


@dataclass(frozen=True)
class Network:
    """One network definition: its name, file, and either the bridge its guests join or,
    for a macvtap network, the device and mode of their macvtap links."""

    name: str
    path: Path
    bridge: str | None
    forward: str | None = None
    direct_dev: str | None = None


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise ConfigError(f"network name '{one_line(name, 80)}' is not valid (no '/', not "
                          "starting with '.')")


def load_network(directory: Path, name: str) -> Network:
    """The definition of network ``name`` in ``directory``; a ``ConfigError`` naming it when
    it is not defined or has no bridge."""
    _check_name(name)
    path = directory / f"{name}.xml"
    try:  # O_NONBLOCK: a FIFO there must not hang the start
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"network '{one_line(name, 80)}' is not defined: there is no {path}; define it "
            "there (libvirt network XML with <bridge name='BRIDGE'/>) or use <interface "
            "type='bridge'><source bridge='BRIDGE'/>") from None
    except OSError as exc:
        raise ConfigError(f"cannot read network definition {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"network definition {path} is not a regular file")
        data = f.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise ConfigError(f"network definition {path} is larger than 10 MiB")
    root = safe_tree(data, str(path)).getroot()
    if root.tag != "network":
        raise ConfigError(f"{path}: not a network definition (root element <{root.tag}>, "
                          "expected <network>)")
    declared = "".join(child(root, "name").itertext()) if child(root, "name") is not None \
        else None
    if declared is not None and declared != name:
        raise ConfigError(f"{path}: defines network '{one_line(declared, 80)}', not "
                          f"'{one_line(name, 80)}'; rename the file or fix <name>")
    bridge_el = child(root, "bridge")
    bridge = bridge_el.get("name") if bridge_el is not None else None
    forward_el = child(root, "forward")
    forward = forward_el.get("mode", "nat") if forward_el is not None else None
    if bridge:
        return Network(name=name, path=path, bridge=bridge, forward=forward)
    pool = child(forward_el, "interface") if forward_el is not None else None
    if forward in DIRECT_MODES and pool is not None and pool.get("dev"):
        return Network(name=name, path=path, bridge=None, forward=forward,
                       direct_dev=pool.get("dev"))
    raise ConfigError(
        f"network '{one_line(name, 80)}' ({path}) has no <bridge name='...'/> and is no "
        "macvtap network (<forward mode='bridge|vepa|private|passthrough'><interface "
        "dev='...'/></forward>); vmconfine connects guests to an existing Linux bridge or "
        "through macvtap")


def resolve_interfaces(instance: Instance, domain: Domain) -> None:
    """Fill in every ``type='network'`` interface from its definition: the bridge, or the
    macvtap device and mode (libvirt uses the first ``<forward><interface>``)."""
    for iface in domain.interfaces:
        if iface.type == "network" and iface.source is not None:
            net = load_network(instance.networks_dir, iface.source)
            iface.bridge, iface.direct_dev = net.bridge, net.direct_dev
            if net.direct_dev is not None:
                iface.source_mode = net.forward
