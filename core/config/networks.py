"""Network definitions: what ``<interface type='network'>`` attaches to.

vmconfine runs no virtual-network daemon. A network is a libvirt network XML file
``NAME.xml`` in the instance's networks directory
(:attr:`vmconfine.config.instance.Instance.networks_dir`: ``/etc/vmconfine/qemu/networks``
for ``qemu:///system``, ``ROOT/etc/qemu/networks`` for ``qemu:///embed?root=ROOT``), and
vmconfine reads one thing from it: ``<bridge name='...'/>``, the existing Linux bridge the
guest's tap joins (created by the admin, systemd-networkd, ifupdown, or libvirt's own network
driver for ``virbr0``). An interface that names a network without a definition is an error
naming it: never a silent fall back to user-mode networking.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.domain.xml import child, one_line, safe_tree
from vmconfine.errors import ConfigError
from vmconfine.inputs import MAX_INPUT

if TYPE_CHECKING:
    from vmconfine.config.instance import Instance
    from vmconfine.domain import Domain


@dataclass(frozen=True)
class Network:
    """One network definition: its name, file, bridge and forward mode (informative)."""

    name: str
    path: Path
    bridge: str
    forward: str | None = None


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
    if not bridge:
        raise ConfigError(
            f"network '{one_line(name, 80)}' ({path}) has no <bridge name='...'/>; vmconfine "
            "attaches guests of a network to its existing Linux bridge only")
    return Network(name=name, path=path, bridge=bridge, forward=forward)


def resolve_interfaces(instance: Instance, domain: Domain) -> None:
    """Fill ``bridge`` of every ``type='network'`` interface from its definition."""
    for iface in domain.interfaces:
        if iface.type == "network" and iface.source is not None:
            iface.bridge = load_network(instance.networks_dir, iface.source).bridge
