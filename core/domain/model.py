"""libvirt domain XML: safe parsing, a typed view for the drivers, and faithful serialisation.

``parse_domain(data, source)`` parses with a hardened lxml parser (no entities, no DTD, no
network, 10 MiB cap, NUL bytes refused) and keeps the lxml tree, so elements, attributes,
namespaces and comments vmconfine does not model survive :meth:`Domain.to_xml`. Every error is
``XMLError("<source>: line N: <what>")`` on one line.

Parse modes follow libvirt. A *configuration* is read with libvirt's inactive rules: a dynamic
``<seclabel>``'s ``<label>``/``<imagelabel>`` and every ``<imagelabel>`` are generated values, so
they are dropped (libvirt ignores them), and ``<domain id=>`` is ignored. *Live* XML (status
and journal copies written by ``to_xml(live=True)``) keeps labels, the id and vmconfine's runtime
state. ``parse_domain(..., live=None)`` (the default) tells them apart by the
``<metadata><vmconfine:state/>`` element every live output carries; pass ``live=True`` or
``live=False`` to force a mode. (``virsh dumpxml`` output of a running libvirt domain has no
such element and is read as a configuration, as ``virsh define`` would.)

Views (``Domain``, ``OS``, ``Disk``...) are read from the tree at parse time; ``SecLabel`` is the
exception: it reads and writes its ``<seclabel>`` element, so label generation is recorded in
the tree and shows up in the live XML.

This module holds ``Domain``, ``OS``, ``Loader`` and :func:`parse_domain`; the parts live in
:mod:`vmconfine.domain.xml` (safe parser, XML and unit helpers), :mod:`vmconfine.domain.seclabel`,
:mod:`vmconfine.domain.state` (runtime state in live XML), :mod:`vmconfine.domain.devices` and
:mod:`vmconfine.domain.chardev`. The names listed in ``__all__`` are re-exported here.
"""

from __future__ import annotations

import copy
import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from lxml import etree

from vmconfine.domain.chardev import drop_generated_paths
from vmconfine.domain.devices import (
    Chardev,
    Controller,
    Disk,
    Filesystem,
    Graphics,
    Hostdev,
    Input,
    Interface,
    Rng,
    StorageSource,
    Tpm,
    Watchdog,
    default_disk_bus,
    parse_devices,
)
from vmconfine.domain.display import Audio, Redirdev, Sound, Video, drop_allocated_ports
from vmconfine.domain.guest import (
    Clock,
    Cpu,
    MemoryBacking,
    parse_clock,
    parse_cpu,
    parse_memory_backing,
)
from vmconfine.domain.interface import drop_generated_ifnames
from vmconfine.domain.seclabel import (
    SECLABEL_TYPES,
    DeviceSecLabel,
    SecLabel,
    drop_device_labelskip,
    find_device_seclabel,
    inactive_seclabel,
    normalise_live_seclabel,
    parse_seclabels,
)
from vmconfine.domain.state import VMCONFINE_NS, apply_live, drop_state, find_state, read_state
from vmconfine.domain.xml import (
    BLANK,
    MAX_XML_BYTES,
    UINT_MAX,
    ParseContext,
    child,
    child_text,
    children,
    insert_element,
    int_attr,
    memory_to_kib,
    one_line,
    parse_dec_int,
    remove_element,
    safe_tree,
    unit_scale,
    yes_no,
)
from vmconfine.domain.xml import xml_error as xml_error

__all__ = [
    "MAX_XML_BYTES",
    "OS",
    "QEMU_NS",
    "VMCONFINE_NS",
    "Chardev",
    "Controller",
    "DeviceSecLabel",
    "Disk",
    "Domain",
    "Filesystem",
    "Graphics",
    "Hostdev",
    "Input",
    "Interface",
    "Loader",
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

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VIRT_TYPES = ("qemu", "kvm")
BOOT_DEVS = ("fd", "cdrom", "hd", "network")
LIFECYCLE_ACTIONS = ("destroy", "restart", "rename-restart", "preserve")
CRASH_ACTIONS = (*LIFECYCLE_ACTIONS, "coredump-destroy", "coredump-restart")
_ENV_FIRST = re.compile(r"[A-Za-z_]")
_ENV_REST = re.compile(r"[A-Za-z0-9_]*")


# --------------------------------------------------------------------------- os


@dataclass
class Loader:
    """``<os><loader>``: firmware ``path``, ``readonly``, ``type`` (rom/pflash or None)."""

    path: str | None
    readonly: bool = False
    type: str | None = None
    secure: bool = False


@dataclass
class OS:
    """``<os>``: guest type (hvm), arch/machine (None when not given), boot order, direct
    kernel boot files, firmware loader and NVRAM file. ``boot_devs`` defaults to ['hd'] when
    neither ``<boot dev>`` nor per-device ``<boot order>`` is given (libvirt)."""

    type: str
    arch: str | None = None
    machine: str | None = None
    boot_devs: list[str] = field(default_factory=list)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    dtb: str | None = None
    loader: Loader | None = None
    nvram: str | None = None
    nvram_template: str | None = None
    firmware: str | None = None
    #: ``<firmware><feature enabled name>``: secure-boot / enrolled-keys → wanted or refused
    firmware_features: dict[str, bool] = field(default_factory=dict)


FIRMWARE_TYPES = ("efi", "bios")
FIRMWARE_FEATURES = ("secure-boot", "enrolled-keys")


def _parse_firmware(ctx: ParseContext, os_el: etree._Element, result: OS) -> None:
    """``<os firmware=>`` and ``<firmware><feature>`` with libvirt 9.0's rules and messages."""
    if result.firmware is not None and result.firmware not in FIRMWARE_TYPES:
        raise ctx.error(os_el, f"unknown firmware value '{one_line(result.firmware, 40)}'; use "
                               "firmware='efi' or firmware='bios'")
    fw_el = child(os_el, "firmware")
    for feat in children(fw_el, "feature") if fw_el is not None else []:
        name = feat.get("name")
        if name not in FIRMWARE_FEATURES:
            raise ctx.error(feat, f"invalid firmware feature name '{one_line(name or '', 40)}'; "
                                  "use secure-boot or enrolled-keys")
        if feat.get("enabled") is None:
            raise ctx.error(feat, "firmware feature needs enabled='yes' or enabled='no'")
        result.firmware_features[name] = yes_no(ctx, feat, "enabled", False)
    if result.firmware_features and result.firmware != "efi":
        raise ctx.error(fw_el, "firmware features need firmware autoselection; add "
                               "firmware='efi' to <os>")
    if result.firmware_features.get("enrolled-keys") and \
            result.firmware_features.get("secure-boot") is False:
        raise ctx.error(fw_el, "firmware feature 'enrolled-keys' cannot be enabled when "
                               "firmware feature 'secure-boot' is disabled")


def _parse_os(ctx: ParseContext, root: etree._Element, device_boot: bool) -> OS:
    os_el = child(root, "os")
    type_el = child(os_el, "type") if os_el is not None else None
    os_type = child_text(os_el, "type") if os_el is not None else None
    if os_el is None or type_el is None or not os_type:
        raise ctx.error(os_el if os_el is not None else root,
                        "an os <type> must be specified; add <os><type>hvm</type></os>")
    if os_type.strip() != "hvm":
        raise ctx.error(type_el, f"os type '{one_line(os_type, 40)}' is not supported; QEMU "
                                 "guests use <type>hvm</type>")
    result = OS(type="hvm", arch=type_el.get("arch"), machine=type_el.get("machine"),
                kernel=child_text(os_el, "kernel"), initrd=child_text(os_el, "initrd"),
                cmdline=child_text(os_el, "cmdline"), dtb=child_text(os_el, "dtb"),
                firmware=os_el.get("firmware"))
    boots = children(os_el, "boot")
    for boot in boots[: len(BOOT_DEVS)]:
        dev = boot.get("dev")
        if dev is None:
            raise ctx.error(boot, "missing boot device; use <boot dev='hd'/>")
        if dev not in BOOT_DEVS:
            raise ctx.error(boot, f"unknown boot device '{dev}'; use fd, cdrom, hd or network")
        result.boot_devs.append(dev)
    if boots and device_boot:
        raise ctx.error(boots[0], "per-device boot elements cannot be used together with "
                                  "os/boot elements; keep one of them")
    if not boots and not device_boot:
        result.boot_devs = ["hd"]
    _parse_firmware(ctx, os_el, result)
    loader = child(os_el, "loader")
    if loader is not None:
        result.loader = Loader(path=child_text(os_el, "loader"), type=loader.get("type"),
                               readonly=yes_no(ctx, loader, "readonly", False),
                               secure=yes_no(ctx, loader, "secure", False))
    nvram = child(os_el, "nvram")
    if nvram is not None:
        source = child(nvram, "source")
        result.nvram = source.get("file") if source is not None else (nvram.text or None)
        result.nvram_template = nvram.get("template")
    return result


# --------------------------------------------------------------------------- the domain


@dataclass(eq=False)
class Domain:
    """A parsed domain. ``tree`` is the lxml document (the source of truth for
    :meth:`to_xml`); the other fields are views read from it at parse time.

    ``uuid`` is lowercase canonical; ``uuid_generated`` is True when the XML had none and a
    random one was generated (and written into the tree, as libvirt does). ``id`` is only read
    in live mode. ``state`` holds vmconfine's runtime metadata (see :meth:`to_xml`).
    """

    tree: etree._ElementTree = field(repr=False)
    source: str
    name: str
    uuid: str
    virt_type: str
    memory_kib: int
    current_memory_kib: int
    vcpus: int
    os: OS
    uuid_generated: bool = False
    live: bool = False
    id: int | None = None
    title: str | None = None
    description: str | None = None
    max_memory_kib: int | None = None
    vcpus_current: int | None = None
    features: list[str] = field(default_factory=list)
    clock_offset: str = "utc"
    clock: Clock = field(default_factory=Clock)
    vmport: str | None = None  #: <features><vmport state='on|off'/>
    smm: str | None = None  #: <features><smm state='on|off'/>
    #: ``<features><hyperv>`` enlightenments in document order: (name, value) with value
    #: ``on``/``off``, the spinlock retry count or the vendor id
    hyperv: list[tuple[str, str]] = field(default_factory=list)
    #: ``<pm><suspend-to-mem|suspend-to-disk enabled>``: "s3"/"s4" → enabled (absent: QEMU's)
    pm: dict[str, bool] = field(default_factory=dict)
    #: the ``<os>`` element as configured, when firmware auto-selection filled in the loader
    #: and NVRAM (:meth:`fill_firmware`): the inactive XML shows it again, the live XML the
    #: resolved firmware (kept in live XML as state ``configos``)
    config_os: str | None = None
    #: ``<smm state='on'/>`` was added for SMM firmware (state ``smmfilled``): not in the
    #: inactive XML
    smm_filled: bool = False
    cpu: Cpu | None = None
    memory_backing: MemoryBacking | None = None
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    emulator: str | None = None
    disks: list[Disk] = field(default_factory=list)
    chardevs: list[Chardev] = field(default_factory=list)
    graphics: list[Graphics] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    hostdevs: list[Hostdev] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=list)
    memballoon: str | None = None
    tpms: list[Tpm] = field(default_factory=list)
    rngs: list[Rng] = field(default_factory=list)
    filesystems: list[Filesystem] = field(default_factory=list)
    watchdogs: list[Watchdog] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    sounds: list[Sound] = field(default_factory=list)
    redirdevs: list[Redirdev] = field(default_factory=list)
    #: top-level ``<audio>`` backends (libvirt 7.2+)
    audios: list[Audio] = field(default_factory=list)
    seclabels: list[SecLabel] = field(default_factory=list)
    qemu_args: list[str] = field(default_factory=list)
    qemu_env: list[tuple[str, str | None]] = field(default_factory=list)
    state: dict[str, str | list[str]] = field(default_factory=dict)
    #: chardev source paths vmconfine generated at start (virtio channels without a path);
    #: kept in live XML as state ``generated`` and left out of the inactive XML
    generated_paths: list[str] = field(default_factory=list)

    @property
    def root(self) -> etree._Element:
        """The ``<domain>`` element."""
        return self.tree.getroot()

    def runtime_state(self) -> dict[str, str | list[str]]:
        """A copy of the vmconfine runtime state read from live XML (``{}`` for a config)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self.state.items()}

    def seclabel(self, model: str) -> SecLabel | None:
        """The domain seclabel for ``model``, or None."""
        return next((s for s in self.seclabels if s.model == model), None)

    def add_seclabel(self, model: str, type: str = "dynamic", implicit: bool = True,
                     ) -> SecLabel:
        """Add ``<seclabel type=.. model=.. relabel=..>`` (libvirt's position: after
        ``<devices>``, after any other seclabel) and return its view."""
        if type not in SECLABEL_TYPES:
            raise ValueError(f"seclabel type must be one of {SECLABEL_TYPES}, not {type!r}")
        if self.seclabel(model) is not None:
            raise ValueError(f"domain {self.name!r} already has a seclabel for model {model!r}")
        el = etree.Element("seclabel")
        el.set("type", type)
        el.set("model", model)
        if type != "none":
            el.set("relabel", "yes" if type == "dynamic" else "no")
        root = self.root
        if self.seclabels:
            index = root.index(self.seclabels[-1].element) + 1
        else:
            devices = child(root, "devices")
            later = [i for i, c in enumerate(root) if isinstance(c.tag, str) and
                     (c.tag in ("keywrap", "launchSecurity") or c.tag.startswith("{"))]
            index = (root.index(devices) + 1 if devices is not None
                     else later[0] if later else len(root))
        insert_element(root, index, el)
        sec = SecLabel(el, implicit=implicit)
        self.seclabels.append(sec)
        return sec

    def remove_seclabel(self, sec: SecLabel) -> None:
        """Remove ``sec`` from the domain and the tree."""
        self.seclabels.remove(sec)
        remove_element(sec.element)

    def fill_firmware(self, loader: str, nvram: str, template: str | None, *,
                      secure: bool, smm: bool) -> None:
        """Record the firmware auto-selection picked (libvirt's qemuFirmwareEnableFeatures):
        a read-only pflash ``<loader>`` (``secure='yes'`` for SMM firmware), the ``<nvram
        template=>`` file and, for firmware that requires SMM, ``<smm state='on'/>``. The
        ``firmware=`` attribute and ``<firmware>`` go, as in libvirt's live XML; the inactive
        XML shows the ``<os>`` as configured (:attr:`config_os`)."""
        os_el = child(self.root, "os")
        assert os_el is not None
        if self.config_os is None:
            self.config_os = etree.tostring(os_el, encoding="unicode", with_tail=False)
        os_el.attrib.pop("firmware", None)
        fw_el = child(os_el, "firmware")
        if fw_el is not None:
            remove_element(fw_el)
        loader_el = child(os_el, "loader")
        if loader_el is None:
            loader_el = etree.Element("loader")
            insert_element(os_el, os_el.index(child(os_el, "type")) + 1, loader_el)
        attrs = {"readonly": "yes", **({"secure": "yes"} if secure else {}), "type": "pflash"}
        loader_el.attrib.clear()
        loader_el.attrib.update(attrs)
        loader_el.text = loader
        self.os.firmware = None
        self.os.firmware_features = {}
        self.os.loader = Loader(path=loader, readonly=True, type="pflash", secure=secure)
        self.fill_nvram(nvram, template)
        if smm and self.smm is None:
            features = child(self.root, "features")
            if features is None:
                features = etree.Element("features")
                insert_element(self.root, self.root.index(os_el) + 1, features)
                self.features = []
            el = etree.Element("smm")
            el.set("state", "on")
            insert_element(features, len(features), el)
            self.features.append("smm")
            self.smm = "on"
            self.smm_filled = True

    def fill_nvram(self, nvram: str, template: str | None = None) -> None:
        """Give the pflash loader its NVRAM file when the XML names none (libvirt's default
        ``<nvram_dir>/<name>_VARS.fd``) and record the template; only the live XML shows it."""
        os_el = child(self.root, "os")
        assert os_el is not None
        if self.config_os is None:
            self.config_os = etree.tostring(os_el, encoding="unicode", with_tail=False)
        nvram_el = child(os_el, "nvram")
        if nvram_el is None:
            loader_el = child(os_el, "loader")
            after = loader_el if loader_el is not None else child(os_el, "type")
            nvram_el = etree.Element("nvram")
            insert_element(os_el, os_el.index(after) + 1, nvram_el)
        if template is not None:
            nvram_el.set("template", template)
        if child(nvram_el, "source") is None and not (nvram_el.text or "").strip(BLANK):
            nvram_el.text = nvram
        self.os.nvram = self.os.nvram or nvram
        self.os.nvram_template = template or self.os.nvram_template

    def to_xml(self, live: bool = False, extra: Mapping[str, object] | None = None) -> str:
        """Serialise the tree (unknown elements, attributes, namespaces, comments included).

        ``live=False`` gives the inactive (config) XML as libvirt does: no ``id``, implicit
        seclabels left out, generated labels dropped (a dynamic seclabel's ``<label>`` and
        every ``<imagelabel>``), device ``labelskip`` and vmconfine runtime state removed.

        ``live=True`` gives the live XML: seclabels as ``<seclabel type model relabel>`` with
        ``<label>``, ``<imagelabel>``, ``<baselabel>`` in libvirt's order, plus ``extra``:

        - ``extra["id"]`` (int) → ``<domain type='..' id='N'>``;
        - ``extra["state"]`` (a mapping) and every other key → ``<metadata><vmconfine:state
          xmlns:vmconfine="https://vmconfine.dev/xmlns/1.0">``: a scalar becomes an attribute
          ``key="value"`` (bool → yes/no; None is skipped), a list becomes one
          ``<vmconfine:KEY value="item"/>`` per item. E.g. ``{"id": 3, "state": {"pid": 42},
          "taints": ["custom-argv"]}`` → ``<vmconfine:state pid="42"><vmconfine:taints
          value="custom-argv"/></vmconfine:state>``. Parsing gives it back as ``Domain.state``
          / :meth:`runtime_state` (``{"pid": "42", "taints": ["custom-argv"]}``).

        A state already in the tree is replaced when ``extra`` has state keys and kept
        otherwise; live output always has a (possibly empty) ``<vmconfine:state>``, which is
        how :func:`parse_domain` recognises live XML.
        """
        doc = copy.deepcopy(self.tree)
        root = doc.getroot()
        positions = {self.root.index(s.element): s for s in self.seclabels}
        copies = {i: root[i] for i in positions}
        if live:
            apply_live(root, extra or {})
            for i, sec in positions.items():
                normalise_live_seclabel(copies[i], sec)
        else:
            root.attrib.pop("id", None)
            drop_generated_paths(root, self.generated_paths)
            if self.config_os is not None:
                _restore_os(root, self.config_os, self.smm_filled)
            drop_allocated_ports(root)
            drop_generated_ifnames(root)
            for i, sec in positions.items():
                inactive_seclabel(copies[i], sec)
            drop_device_labelskip(root)
            drop_state(root)
        return etree.tostring(doc, encoding="unicode")


def _restore_os(root: etree._Element, config_os: str, smm_filled: bool) -> None:
    """Put the configured ``<os>`` back (and drop the ``<smm>`` firmware selection added)."""
    os_el = child(root, "os")
    if os_el is None:
        return
    original = etree.fromstring(config_os)
    original.tail = os_el.tail
    root.replace(os_el, original)
    features = child(root, "features")
    smm = child(features, "smm") if features is not None else None
    if smm_filled and smm is not None:
        remove_element(smm)
        if features is not None and len(features) == 0:
            remove_element(features)


# --------------------------------------------------------------------------- parsing


def _parse_uuid(text: str) -> str | None:
    """libvirt's virUUIDParse: 32 hex digits, '-' or ' ' between byte pairs, blanks around."""
    s = text.strip(BLANK)
    digits: list[str] = []
    i = 0
    while len(digits) < 16:
        if i >= len(s):
            return None
        if s[i] in "- ":
            i += 1
            continue
        pair = s[i:i + 2]
        if len(pair) < 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
            return None
        digits.append(pair.lower())
        i += 2
    if s[i:]:
        return None
    return str(uuidlib.UUID("".join(digits)))


def _memory(ctx: ParseContext, el: etree._Element | None, what: str,
            value: str | None = None) -> int | None:
    if el is None:
        return None
    text = value if value is not None else "".join(el.itertext())
    try:
        return memory_to_kib(text, el.get("unit"))
    except ValueError as exc:
        raise ctx.error(el, f"{what}: {exc}") from None


#: the most vCPUs any QEMU machine type takes (x86 q35 since QEMU 9.0); libvirt checks the
#: machine type's own limit later, vmconfine refuses larger counts at parse time (QEMU would
#: otherwise size per-vCPU structures from the number before refusing it)
MAX_VCPUS = 4096

#: longest domain name: it names files such as ``.NAME.qmp.lock`` (file names ≤ 255 bytes)
MAX_NAME_BYTES = 200


def _parse_name(ctx: ParseContext, root: etree._Element) -> str:
    name_el = child(root, "name")
    name = child_text(root, "name")
    if name is None:
        raise ctx.error(name_el if name_el is not None else root,
                        "missing domain name; add <name>...</name>")
    if "/" in name:
        raise ctx.error(name_el, f"domain name '{one_line(name, 80)}' must not contain '/'")
    if "\n" in name:
        raise ctx.error(name_el, "domain name must not contain a newline (invalid char 0x0a)")
    if not name:
        raise ctx.error(name_el, "domain name must not be empty")
    if name.startswith("."):
        # the instance's state files are NAME.xml, NAME.journal...; dot-files are its own
        raise ctx.error(name_el, f"domain name '{one_line(name, 80)}' must not start with '.'")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ctx.error(name_el, f"domain name is {len(name.encode())} bytes long; "
                        f"at most {MAX_NAME_BYTES} are allowed (it names state files)")
    return name


def _on_off(ctx: ParseContext, features: etree._Element | None, tag: str) -> str | None:
    """``<features><TAG state='on|off'/>`` (vmport, smm), None when absent."""
    el = child(features, tag) if features is not None else None
    if el is None:
        return None
    state = el.get("state", "on" if tag == "smm" else None)
    if state not in ("on", "off"):
        raise ctx.error(el, f"<{tag}> needs state='on' or state='off'")
    return state


#: the Hyper-V enlightenments vmconfine renders (libvirt 9.0's names)
HYPERV_FEATURES = ("relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer",
                   "reset", "vendor_id", "frequencies", "reenlightenment", "tlbflush", "ipi",
                   "evmcs")
#: the fewest spinlock retries Hyper-V accepts (libvirt's check)
MIN_SPINLOCK_RETRIES = 4095


def _hyperv(ctx: ParseContext, features: etree._Element | None) -> list[tuple[str, str]]:
    """``<features><hyperv mode='custom'>`` with libvirt's rules."""
    hv = child(features, "hyperv") if features is not None else None
    if hv is None:
        return []
    if hv.get("mode", "custom") != "custom":
        raise ctx.error(hv, f"hyperv mode '{one_line(hv.get('mode', ''), 20)}' is not "
                            "supported; use mode='custom' (the default)")
    out: list[tuple[str, str]] = []
    for el in hv:
        if not isinstance(el.tag, str):
            continue
        if el.tag not in HYPERV_FEATURES:
            raise ctx.error(el, f"unsupported HyperV Enlightenment feature: "
                                f"{one_line(el.tag, 40)}")
        state = el.get("state")
        if state not in ("on", "off"):
            raise ctx.error(el, f"<hyperv><{el.tag}> needs state='on' or state='off'")
        value = state
        if el.tag == "spinlocks" and state == "on":
            retries = int_attr(ctx, el, "retries", "spinlock retries")
            if retries is None:
                raise ctx.error(el, "missing HyperV spinlock retry count; add retries='8191'")
            if retries < MIN_SPINLOCK_RETRIES:
                raise ctx.error(el, f"HyperV spinlock retry count must be at least "
                                    f"{MIN_SPINLOCK_RETRIES}, not {retries}")
            value = str(retries)
        elif el.tag == "vendor_id" and state == "on":
            vendor = el.get("value") or ""
            if not 0 < len(vendor) <= 12 or not vendor.isascii() or not vendor.isalnum():
                raise ctx.error(el, "HyperV vendor_id value must be 1 to 12 letters or digits")
            value = vendor
        out.append((el.tag, value))
    return out


def _pm(ctx: ParseContext, root: etree._Element) -> dict[str, bool]:
    """``<pm>``: suspend-to-mem (S3) and suspend-to-disk (S4) enabled yes/no."""
    pm = child(root, "pm")
    out: dict[str, bool] = {}
    for tag, key in (("suspend-to-mem", "s3"), ("suspend-to-disk", "s4")):
        el = child(pm, tag) if pm is not None else None
        if el is not None and el.get("enabled") is not None:
            out[key] = yes_no(ctx, el, "enabled", False)
    return out


def _lifecycle(ctx: ParseContext, root: etree._Element, tag: str, default: str,
               allowed: tuple[str, ...]) -> str:
    el = child(root, tag)
    if el is None:
        return default
    value = (el.text or "").strip(BLANK)
    if value not in allowed:
        raise ctx.error(el, f"invalid <{tag}> action '{value}'; use one of {', '.join(allowed)}")
    return value


def _parse_qemu_namespace(ctx: ParseContext, root: etree._Element,
                          ) -> tuple[list[str], list[tuple[str, str | None]]]:
    """``<qemu:commandline>`` args and env, with libvirt's env-name rules."""
    args: list[str] = []
    env: list[tuple[str, str | None]] = []
    for cmd in root.findall(f"{{{QEMU_NS}}}commandline"):
        for arg in cmd.findall(f"{{{QEMU_NS}}}arg"):
            value = arg.get("value")
            if value is None:
                raise ctx.error(arg, "No qemu command-line argument specified; "
                                     "use <qemu:arg value='...'/>")
            args.append(value)
        for var in cmd.findall(f"{{{QEMU_NS}}}env"):
            name = var.get("name")
            if name is None:
                raise ctx.error(var, "No qemu environment name specified")
            if name == "":
                raise ctx.error(var, "Empty qemu environment name specified")
            if not _ENV_FIRST.match(name[0]):
                raise ctx.error(var, "Invalid environment name, it must begin with a letter "
                                     f"or underscore: '{one_line(name, 60)}'")
            if not _ENV_REST.fullmatch(name[1:]):
                raise ctx.error(var, "Invalid environment name, it must contain only "
                                     f"alphanumerics and underscore: '{one_line(name, 60)}'")
            env.append((name, var.get("value")))
    return args, env


def parse_domain(data: bytes | str, source: str = "<stdin>", *,
                 live: bool | None = None) -> Domain:
    """Parse and validate domain XML. ``live``: None = detect (live XML carries
    ``<vmconfine:state>``), True = live/status rules, False = configuration rules.

    Raises :class:`vmconfine.errors.XMLError` ("<source>: line N: <what>") for malformed or
    hostile input and for invalid definitions.
    """
    tree = safe_tree(data, source)
    root = tree.getroot()
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise ParseContext(source, False).error(root, f"root element is <{tag}>, expected "
                                                      "<domain>")
    if live is None:
        live = find_state(root) is not None
    ctx = ParseContext(source, live)
    virt_type = root.get("type")
    if virt_type is None:
        raise ctx.error(root, "<domain> has no type attribute; use type='kvm' or type='qemu'")
    if virt_type not in VIRT_TYPES:
        raise ctx.error(root, f"domain type '{virt_type}' is not supported; vmconfine runs "
                              "type='kvm' or type='qemu'")
    name = _parse_name(ctx, root)
    uuid_el = child(root, "uuid")
    uuid_text = child_text(root, "uuid")
    generated = uuid_text is None
    if uuid_text is None:
        uuid = str(uuidlib.uuid4())
        if uuid_el is None:
            uuid_el = etree.Element("uuid")
            name_el = child(root, "name")
            insert_element(root, root.index(name_el) + 1 if name_el is not None else 0, uuid_el)
        uuid_el.text = uuid
    else:
        parsed = _parse_uuid(uuid_text)
        if parsed is None:
            raise ctx.error(uuid_el, f"malformed uuid '{one_line(uuid_text, 80)}'; expected 32 "
                                     "hex digits such as 4dea24b3-1d52-d8f3-2516-782e98a23fa0")
        uuid = parsed
        if uuid_el is not None and uuid_el.text != uuid and len(uuid_el) == 0:
            uuid_el.text = uuid  # libvirt writes the canonical form
    memory = _memory(ctx, child(root, "memory"), "<memory>")
    cells = root.findall("cpu/numa/cell")
    if cells:
        memory = sum(_memory(ctx, c, "<numa> cell memory", c.get("memory", "")) or 0
                     for c in cells)
    if not memory:
        raise ctx.error(root, "Memory size must be specified via <memory> or in the <numa> "
                              "configuration; add e.g. <memory unit='MiB'>512</memory>")
    current = _memory(ctx, child(root, "currentMemory"), "<currentMemory>")
    if not current or current > memory:
        current = memory  # libvirt clamps currentMemory to the total
    vcpus, vcpus_current = 1, None
    vcpu_el = child(root, "vcpu")
    if vcpu_el is not None:
        text = "".join(vcpu_el.itertext())
        count = parse_dec_int(text)
        if count is None or not 0 <= count <= UINT_MAX:
            raise ctx.error(vcpu_el, f"maximum vcpus count must be an integer, not "
                                     f"'{one_line(text.strip(), 40)}'")
        if count == 0:
            raise ctx.error(vcpu_el, "a domain needs at least 1 vCPU")
        if count > MAX_VCPUS:
            raise ctx.error(vcpu_el, f"Maximum CPUs greater than the limit of every QEMU "
                                     f"machine type ({MAX_VCPUS}): <vcpu>{count}</vcpu>; give "
                                     "fewer vCPUs")
        vcpus = count
        vcpus_current = int_attr(ctx, vcpu_el, "current", "current vcpus count")
        if vcpus_current is not None and not 0 < vcpus_current <= vcpus:
            raise ctx.error(vcpu_el, f"current vcpus ({vcpus_current}) must be between 1 and "
                                     f"the maximum ({vcpus})")
    devices = parse_devices(ctx, child(root, "devices"))
    device_boot = any(b.get("order") is not None for b in root.iterfind("devices/*/boot"))
    features_el = child(root, "features")
    clock = parse_clock(ctx, root)
    dom = Domain(
        tree=tree, source=source, name=name, uuid=uuid, uuid_generated=generated,
        virt_type=virt_type, live=live, memory_kib=memory, current_memory_kib=current,
        vcpus=vcpus, vcpus_current=vcpus_current, os=_parse_os(ctx, root, device_boot),
        id=int_attr(ctx, root, "id", "domain id", signed=True) if live else None,
        title=child_text(root, "title"), description=child_text(root, "description"),
        max_memory_kib=_memory(ctx, child(root, "maxMemory"), "<maxMemory>"),
        features=[etree.QName(c).localname for c in features_el if isinstance(c.tag, str)]
        if features_el is not None else [],
        clock=clock, clock_offset=clock.offset, cpu=parse_cpu(ctx, root),
        vmport=_on_off(ctx, features_el, "vmport"), smm=_on_off(ctx, features_el, "smm"),
        pm=_pm(ctx, root), hyperv=_hyperv(ctx, features_el),
        memory_backing=parse_memory_backing(ctx, root),
        on_poweroff=_lifecycle(ctx, root, "on_poweroff", "destroy", LIFECYCLE_ACTIONS),
        on_reboot=_lifecycle(ctx, root, "on_reboot", "restart", LIFECYCLE_ACTIONS),
        on_crash=_lifecycle(ctx, root, "on_crash", "destroy", CRASH_ACTIONS),
        emulator=devices.emulator, disks=devices.disks, chardevs=devices.chardevs,
        graphics=devices.graphics, interfaces=devices.interfaces, hostdevs=devices.hostdevs,
        inputs=devices.inputs, controllers=devices.controllers,
        memballoon=devices.memballoon, tpms=devices.tpms, rngs=devices.rngs,
        filesystems=devices.filesystems, watchdogs=devices.watchdogs,
        videos=devices.videos, sounds=devices.sounds, redirdevs=devices.redirdevs,
        audios=devices.audios,
        seclabels=parse_seclabels(ctx, root),
        state=read_state(root))
    generated = dom.state.get("generated", [])
    dom.generated_paths = list(generated) if isinstance(generated, list) else []
    config_os = dom.state.get("configos")
    dom.config_os = config_os if isinstance(config_os, str) and config_os else None
    dom.smm_filled = dom.state.get("smmfilled") == "yes"
    dom.qemu_args, dom.qemu_env = _parse_qemu_namespace(ctx, root)
    return dom
