"""Firmware auto-selection (``<os firmware='efi'>``) from QEMU's firmware descriptors, as
libvirt 9.0's ``qemu_firmware.c`` does it.

The descriptors are QEMU's interoperable JSON format (``docs/interop/firmware.json`` in QEMU;
Debian's ``ovmf`` package installs ``/usr/share/qemu/firmware/*.json``). They are read from
``/usr/share/qemu/firmware``, then ``/etc/qemu/firmware``, then (unprivileged instances only)
``$XDG_CONFIG_HOME/qemu/firmware``: a later directory's file overrides an earlier one with the
same file name, an empty file hides it, and the result is taken in file-name order, which is
the priority order (``40-...`` before ``60-...``).

A descriptor matches a domain when (libvirt's ``qemuFirmwareMatchDomain``):

- its ``interface-types`` has ``uefi`` for ``firmware='efi'`` (``bios`` for ``'bios'``); a
  ``<loader>PATH`` given (an old-style read-only pflash loader without an NVRAM template, or,
  as libvirt 9.2+ accepts, next to ``firmware=``) takes only a flash descriptor whose
  executable is PATH;
- a target has the guest architecture and a machine glob (``*``/``?``) matching the resolved
  machine type (``q35`` → ``pc-q35-7.2``, :mod:`vmconfine.qemu.machines`);
- ``<pm><suspend-to-mem|disk enabled='yes'>`` need ``acpi-s3``/``acpi-s4``;
- ``<firmware><feature name='secure-boot|enrolled-keys' enabled='yes|no'>`` must be present /
  absent;
- ``<loader secure='yes'>`` needs ``requires-smm``;
- the mapping is a split flash (executable + NVRAM template; stateless and combined flash are
  skipped).

The first match fills the domain: a read-only pflash loader, ``secure='yes'`` and SMM when the
firmware ``requires-smm``, and the NVRAM file ``<nvram_dir>/<name>_VARS.fd`` (unless the XML
names one) made from the template at start — never over an existing file unless asked
(``run --reset-nvram``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmconfine.domain.xml import one_line
from vmconfine.qemu.argv_devices import UnsupportedConfigError

if TYPE_CHECKING:
    from vmconfine.domain import Domain

#: where QEMU's firmware descriptors are looked for, lowest priority first
SYSTEM_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")
#: the largest descriptor read (libvirt: 1 MiB)
MAX_DESCRIPTOR = 1 << 20
INTERFACES = {"efi": "uefi", "bios": "bios"}
KNOWN_INTERFACES = frozenset({"bios", "openfirmware", "uboot", "uefi"})
KNOWN_DEVICES = frozenset({"flash", "kernel", "memory"})


class FirmwareError(UnsupportedConfigError):
    """No firmware satisfies the domain, or a descriptor is broken (one line)."""


@dataclass(frozen=True)
class Descriptor:
    """One parsed firmware descriptor (the parts libvirt reads)."""

    path: str
    interfaces: tuple[str, ...]
    device: str
    executable: str | None = None
    executable_format: str | None = None
    nvram_template: str | None = None
    nvram_template_format: str | None = None
    mode: str = "split"
    targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    features: frozenset[str] = frozenset()


def search_dirs(privileged: bool) -> list[str]:
    """The descriptor directories, lowest priority first."""
    dirs = list(SYSTEM_DIRS)
    if not privileged:
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
            os.path.expanduser("~"), ".config")
        dirs.append(os.path.join(config, "qemu", "firmware"))
    return dirs


def descriptor_paths(dirs: list[str]) -> list[str]:
    """``*.json`` files of ``dirs`` by file name, a later directory overriding an earlier one
    and an empty file hiding the name, in file-name (priority) order."""
    chosen: dict[str, str] = {}
    for d in dirs:
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise FirmwareError(f"cannot read firmware descriptor directory {one_line(d)}: "
                                f"{exc.strerror}") from None
        for name in names:
            if name.endswith(".json"):
                chosen[name] = os.path.join(d, name)
    out = []
    for name in sorted(chosen):
        with contextlib.suppress(OSError):
            if os.stat(chosen[name]).st_size == 0:
                continue  # masks the file of that name in a lower directory
        out.append(chosen[name])
    return out


def _bad(path: str, what: str) -> FirmwareError:
    return FirmwareError(f"firmware descriptor {one_line(path)}: {what}; fix or remove the file "
                         "(an empty file of the same name in /etc/qemu/firmware hides it)")


def _strings(path: str, doc: dict[str, object], key: str) -> list[str]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, f"'{key}' must be a list of strings")
    return list(value)  # type: ignore[arg-type]


def _flash_file(path: str, mapping: dict[str, object], key: str) -> tuple[str, str]:
    entry = mapping.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) \
            or not isinstance(entry.get("format"), str):
        raise _bad(path, f"mapping '{key}' needs a filename and a format")
    return entry["filename"], entry["format"]


def parse_descriptor(path: str) -> Descriptor:
    """Read one descriptor; a malformed one is a :class:`FirmwareError` naming the file (as
    libvirt, which then selects nothing)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DESCRIPTOR + 1)
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_DESCRIPTOR:
        raise _bad(path, "larger than 1 MiB")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not JSON ({one_line(str(exc), 80)})") from None
    if not isinstance(doc, dict):
        raise _bad(path, "not a JSON object")
    interfaces = _strings(path, doc, "interface-types")
    for name in interfaces:
        if name not in KNOWN_INTERFACES:
            raise _bad(path, f"unknown interface type '{one_line(name, 40)}'")
    mapping = doc.get("mapping")
    if not isinstance(mapping, dict) or mapping.get("device") not in KNOWN_DEVICES:
        raise _bad(path, "'mapping' needs a device of flash, kernel or memory")
    device = str(mapping["device"])
    fields: dict[str, object] = {}
    if device == "flash":
        mode = mapping.get("mode", "split")
        if mode not in ("split", "combined", "stateless"):
            raise _bad(path, f"unknown flash mode '{one_line(str(mode), 40)}'")
        fields["mode"] = mode
        fields["executable"], fields["executable_format"] = _flash_file(path, mapping,
                                                                        "executable")
        if mode == "split":
            fields["nvram_template"], fields["nvram_template_format"] = _flash_file(
                path, mapping, "nvram-template")
    elif not isinstance(mapping.get("filename"), str):
        raise _bad(path, f"mapping of a {device} device needs a filename")
    else:
        fields["executable"] = mapping["filename"]
    raw_targets = doc.get("targets")
    if not isinstance(raw_targets, list):
        raise _bad(path, "'targets' must be a list")
    targets = []
    for t in raw_targets:
        if not isinstance(t, dict) or not isinstance(t.get("architecture"), str):
            raise _bad(path, "every target needs an architecture")
        targets.append((str(t["architecture"]), tuple(_strings(path, t, "machines"))))
    features = frozenset(_strings(path, doc, "features"))  # unknown ones are ignored
    return Descriptor(path=path, interfaces=tuple(interfaces), device=device,
                      targets=tuple(targets), features=features, **fields)  # type: ignore[arg-type]


def load(dirs: list[str]) -> list[Descriptor]:
    """Every descriptor of ``dirs``, in priority order."""
    return [parse_descriptor(p) for p in descriptor_paths(dirs)]


def glob_match(pattern: str, name: str) -> bool:
    """GLib's ``g_pattern_match_simple``: ``*`` any run, ``?`` one character, nothing else
    special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.S) is not None


def _interface_wanted(domain: Domain) -> str | None:
    os_ = domain.os
    if os_.firmware is not None:
        return INTERFACES[os_.firmware]
    if os_.loader is not None:
        return {"rom": "bios", "pflash": "uefi"}.get(os_.loader.type or "")
    return None


def mismatch(domain: Domain, fw: Descriptor, machine: str, arch: str) -> str | None:
    """Why ``fw`` does not fit ``domain`` (None: it does)."""
    os_ = domain.os
    want = _interface_wanted(domain)
    if os_.loader is not None and (os_.firmware is None or os_.loader.path):
        # an explicit loader (libvirt >= 9.2 also with firmware=): its descriptor only
        if fw.device != "flash" or (os_.loader.path and fw.executable != os_.loader.path):
            return "another loader"
        if os_.loader.type == "rom":
            return "a flash mapping for a ROM loader"
    if want not in fw.interfaces:
        return f"no {want} interface"
    if not any(a == arch and any(glob_match(m, machine) for m in machines)
               for a, machines in fw.targets):
        return f"not for {arch} {machine}"
    if domain.pm.get("s3") and "acpi-s3" not in fw.features:
        return "no S3"
    if domain.pm.get("s4") and "acpi-s4" not in fw.features:
        return "no S4"
    for name in ("secure-boot", "enrolled-keys"):
        wanted = os_.firmware_features.get(name)
        if wanted is not None and wanted != (name in fw.features):
            return f"{name} {'missing' if wanted else 'present'}"
    if os_.loader is not None and os_.loader.secure and "requires-smm" not in fw.features:
        return "no SMM"
    if fw.device == "flash" and fw.mode != "split":
        return f"{fw.mode} flash"
    return None


def needs_selection(domain: Domain, nvram_exists: bool) -> bool:
    """libvirt's rule: ``firmware=`` given, or an old-style read-only pflash loader with no
    NVRAM template whose NVRAM file does not exist yet."""
    os_ = domain.os
    if os_.firmware is not None:
        return True
    loader = os_.loader
    return (loader is not None and bool(loader.path) and loader.type == "pflash"
            and loader.readonly and os_.nvram_template is None and not nvram_exists)


def check_secure_boot(domain: Domain, machine: str) -> None:
    """libvirt's validation: SMM-restricted flash needs a Q35 machine."""
    loader = domain.os.loader
    wants = (loader is not None and loader.secure) or \
        domain.os.firmware_features.get("secure-boot") is True
    if wants and "q35" not in machine:
        raise FirmwareError(f"Secure boot is supported with q35 machine types only (machine "
                            f"'{one_line(machine, 60)}'); use <type machine='q35'>")


def select(domain: Domain, descriptors: list[Descriptor], machine: str, arch: str
           ) -> Descriptor | None:
    """The first descriptor (priority order) that fits ``domain``, or None."""
    return next((fw for fw in descriptors if mismatch(domain, fw, machine, arch) is None), None)


def fill(domain: Domain, descriptors: list[Descriptor], machine: str, arch: str,
         nvram_path: str) -> Descriptor | None:
    """Select the firmware of ``domain`` and record it in the domain (loader, NVRAM and its
    template, SMM); returns the descriptor used, or None when nothing was to be selected."""
    check_secure_boot(domain, machine)
    os_ = domain.os
    nvram_exists = bool(os_.nvram) and os.path.exists(str(os_.nvram))
    if not needs_selection(domain, nvram_exists):
        return None
    fw = select(domain, descriptors, machine, arch)
    if fw is None:
        if os_.firmware is None:
            return None  # an old-style loader: libvirt starts it as given
        shown = ", ".join(os.path.basename(d.path) for d in descriptors) or "none installed"
        fix = ("install Debian's ovmf package or change the <os> firmware requirements"
               if os_.firmware == "efi" else "remove firmware='bios' (QEMU then uses its "
               "built-in SeaBIOS)")
        raise FirmwareError(
            f"Unable to find any firmware to satisfy '{os_.firmware}' for {arch} machine "
            f"'{one_line(machine, 60)}'{_asked(domain)} (descriptors: {shown}); {fix}")
    if fw.device != "flash":
        raise FirmwareError(f"firmware {one_line(fw.path)} is a {fw.device} mapping; only "
                            "flash firmware is supported")
    for what, fmt in (("flash", fw.executable_format), ("nvram template",
                                                         fw.nvram_template_format)):
        if fmt != "raw":
            raise FirmwareError(f"firmware {one_line(fw.path)}: unsupported {what} format "
                                f"'{one_line(str(fmt), 20)}' (only raw)")
    if "requires-smm" in fw.features and domain.smm == "off":
        raise FirmwareError("domain has SMM turned off but chosen firmware requires it "
                            f"({one_line(fw.path)}); remove <smm state='off'/>")
    assert fw.executable is not None
    secure = "requires-smm" in fw.features or bool(os_.loader and os_.loader.secure)
    domain.fill_firmware(fw.executable, os_.nvram or nvram_path,
                         os_.nvram_template or fw.nvram_template,
                         secure=secure, smm="requires-smm" in fw.features)
    return fw


def _asked(domain: Domain) -> str:
    wanted = [f"{name}={'yes' if on else 'no'}"
              for name, on in domain.os.firmware_features.items()]
    if domain.os.loader is not None and domain.os.loader.secure:
        wanted.append("loader secure=yes")
    return f" with {', '.join(wanted)}" if wanted else ""


def create_nvram(path: str, template: str, *, reset: bool = False) -> bool:
    """Make the NVRAM file ``path`` from ``template`` (mode 0600, the caller's owner) unless it
    exists (``reset``: replace it). Never follows a symlink at ``path``; the template must be a
    world-readable regular file (its content ends up readable by QEMU's account); returns True
    when the file was written."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not reset:
            if not stat.S_ISREG(st.st_mode):
                raise FirmwareError(f"NVRAM {one_line(path)} is not a regular file; remove it")
            return False
    try:
        src = os.open(template, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise FirmwareError(f"cannot read the NVRAM template {one_line(template)}: "
                            f"{exc.strerror}") from None
    st = os.fstat(src)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IROTH:
        os.close(src)
        # vmconfine copies it as root into a file QEMU's account then owns: only public
        # firmware files qualify (never /etc/shadow named in a domain XML)
        raise FirmwareError(f"NVRAM template {one_line(template)} is not a regular file that "
                            "everybody may read; give a firmware variable store such as "
                            "/usr/share/OVMF/OVMF_VARS_4M.fd")
    tmp = f"{path}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            while chunk := os.read(src, 1 << 20):
                os.write(dst, chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FirmwareError(f"cannot create the NVRAM {one_line(path)} from "
                            f"{one_line(template)}: {exc.strerror}") from None
    finally:
        os.close(src)
    return True


def nvram_file(nvram_dir: Path, name: str) -> str:
    """libvirt's default NVRAM path: ``<nvram_dir>/<name>_VARS.fd``."""
    return str(nvram_dir / f"{name}_VARS.fd")
