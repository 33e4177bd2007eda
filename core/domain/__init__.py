"""The libvirt domain XML model (``vmconfine.domain``): what the drivers read.

:mod:`~vmconfine.domain.model` holds ``Domain``, ``OS``, ``Loader`` and :func:`parse_domain`; the
parts live beside it: :mod:`~vmconfine.domain.xml` (safe parser, XML and unit helpers),
:mod:`~vmconfine.domain.seclabel`, :mod:`~vmconfine.domain.state` (runtime state in live XML),
:mod:`~vmconfine.domain.devices`, :mod:`~vmconfine.domain.chardev` and
:mod:`~vmconfine.domain.chain` (backing chains). The public views are re-exported here, so
drivers write ``from vmconfine.domain import Disk``.
"""

from vmconfine.domain.guest import Clock, Cpu, MemoryBacking
from vmconfine.domain.model import (
    MAX_XML_BYTES,
    OS,
    QEMU_NS,
    VMCONFINE_NS,
    Chardev,
    Controller,
    DeviceSecLabel,
    Disk,
    Domain,
    Filesystem,
    Graphics,
    Hostdev,
    Input,
    Interface,
    Loader,
    Rng,
    SecLabel,
    StorageSource,
    Tpm,
    Watchdog,
    default_disk_bus,
    find_device_seclabel,
    memory_to_kib,
    parse_domain,
    unit_scale,
)

__all__ = [
    "MAX_XML_BYTES",
    "OS",
    "QEMU_NS",
    "VMCONFINE_NS",
    "Chardev",
    "Clock",
    "Controller",
    "Cpu",
    "DeviceSecLabel",
    "Disk",
    "Domain",
    "Filesystem",
    "Graphics",
    "Hostdev",
    "Input",
    "Interface",
    "Loader",
    "MemoryBacking",
    "Rng",
    "SecLabel",
    "StorageSource",
    "Tpm",
    "Watchdog",
    "default_disk_bus",
    "find_device_seclabel",
    "memory_to_kib",
    "parse_domain",
    "unit_scale",
]
