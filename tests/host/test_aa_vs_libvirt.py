"""Every AppArmor golden (tests/data/apparmor) against libvirt 9.0's virt-aa-helper for the same
XML and the same paths: vmconfine grants the same permissions or narrower ones, and every
difference is one of :data:`DIFFERENCES`, each explained in docs/apparmor.md.

The goldens are vmconfine-aa-helper's output (tests/unit/test_aa_profiles.py keeps them equal
to it); this test only reads them. virt-aa-helper runs in dry-run mode (``-d -r``: it resolves
every path and prints the rules, writes nothing). Both sides get what their abstractions add:
libvirt's profiles include ``abstractions/base`` (read from this host) and libvirt's
``abstractions/libvirt-qemu`` (``/dev/kvm``, ``/dev/ptmx``: :data:`LIBVIRT_QEMU_ABSTRACTION`),
vmconfine's include ``abstractions/vmconfine-qemu`` (plugins/apparmor). The per-instance
paths differ by design (vmconfine's instance directories against libvirt's /var and /run
trees) and are compared by kind (:func:`kind`).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from tests.support import require
from tests.unit.test_aa_profiles import CASES, DATA, prepare, uuid_of

pytestmark = pytest.mark.host

VIRT_AA_HELPER = "/usr/lib/libvirt/virt-aa-helper"
REPO = Path(__file__).resolve().parents[2]
BASE_ABSTRACTION = Path("/etc/apparmor.d/abstractions/base")
VMCONFINE_ABSTRACTION = REPO / "plugins" / "apparmor" / "abstractions" / "vmconfine-qemu"
#: exact-path rules of libvirt 9.0's abstractions/libvirt-qemu for the corpus' device nodes
#: (libvirt-daemon-system, not installed on this host)
LIBVIRT_QEMU_ABSTRACTION = {"/dev/kvm": "rw", "/dev/ptmx": "rw", "/dev/net/tun": "rw"}
#: the cases virt-aa-helper makes a profile for (see "<refused>")
GENERATED = frozenset(CASES) - {"firmware-shared-rom"}
RULE = re.compile(r'^\s*(deny\s+|audit deny\s+)?(?:"([^"]+)"|(\S+))\s+([a-zA-Z]+),\s*$')

#: (kind or path, as :func:`kind` names it) → (ours, libvirt's, why); ``cases`` where it shows.
#: ``-`` = no rule. Each key is explained in docs/apparmor.md ("Compared with virt-aa-helper").
DIFFERENCES: dict[str, tuple[str, str, str, frozenset[str]]] = {
    "<home>": ("rwk", "rw", "QEMU's HOME: vmconfine grants its per-domain directory recursively "
               "with locks (QEMU creates sockets and lock files below it); libvirt grants the "
               "files directly in domain-ID-NAME/", GENERATED),
    "<runtime>": ("rwk", "-", "vmconfine's per-domain runtime directory (monitor sockets); "
                  "libvirt's sockets live in its home directory, covered by <home>",
                  GENERATED),
    "<libvirt-runtime>": ("-", "rwk", "libvirt's own files (pid file, tunnelled migration "
                          "sockets) that vmconfine does not create", GENERATED),
    "console.log": ("rw", "-", "a chardev's <log file>: QEMU opens it itself (logfile=); "
                    "virt-aa-helper 9.0 leaves it out, so the guest fails to start under "
                    "libvirt's profile", frozenset({"console-file-with-log"})),
    "twice.img": ("no deny", "deny w", "the same image as a writable and a read-only disk: "
                  "libvirt also writes 'deny w', which overrides the grant and breaks the "
                  "writable disk; vmconfine writes deny only when nothing grants w",
                  frozenset({"disk-same-image-twice"})),
    "bin/qemu-wrapper": ("rmix", "-", "an emulator outside the abstraction's qemu-system-* "
                         "globs: vmconfine grants exactly it (rmix, deny w); libvirt's "
                         "dry run grants nothing and the exec would be denied",
                         frozenset({"emulator-custom"})),
    "/dev/vfio/[0-9]*": ("-", "rw", "a PCI hostdev: libvirt grants every VFIO group, vmconfine "
                         "only the device's own group (narrower; its group path is in both)",
                         frozenset({"hostdev-pci"})),
    "/dev/bus/usb/002/004": ("rw", "-", "a USB hostdev by bus/device: vmconfine grants the "
                             "device node QEMU opens; virt-aa-helper resolves USB devices on "
                             "the host and finds none here", frozenset({"hostdev-usb"})),
    "<refused>": ("", "", "/usr/share/seabios/... as a <loader>: virt-aa-helper refuses the "
                  "whole domain ('skipped restricted file'); vmconfine grants it read-only "
                  "(k, deny w): firmware QEMU reads anyway", frozenset({"firmware-shared-rom"})),
}


def parse(text: str) -> dict[str, set[str]]:
    """``path`` / ``deny path`` → permission letters, from AppArmor rule lines."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = RULE.match(line)
        path = m.group(2) or m.group(3) if m else ""
        if not m or path.startswith(("capability", "network", "signal", "ptrace")):
            continue
        key = ("deny " if m.group(1) else "") + path
        out.setdefault(key, set()).update(m.group(4))
    return out


def letters(perms: set[str] | None) -> str:
    """Permission letters in AppArmor's usual order (``rwk``, ``rmix``); ``-`` = no rule."""
    return "".join(sorted(perms, key="rwalkmix".index)) if perms else "-"


def kind(path: str, base: str, name: str) -> str:
    """Instance paths by kind (they differ by design); XML paths relative to the case dir."""
    p = path.removeprefix("deny ")
    if p in (f"{base}/inst/log/qemu/{name}.log", f"/var/log/libvirt/**/{name}.log"):
        out = "<log>"
    elif p.startswith(f"{base}/inst/lib/qemu/domain-") or p.startswith(
            "/var/lib/libvirt/qemu/domain-"):
        out = "<home>"
    elif p.startswith(f"{base}/inst/run/qemu/domain-"):
        out = "<runtime>"
    elif p.startswith("/run/libvirt/"):
        out = "<libvirt-runtime>"
    else:
        out = p.removeprefix(base + "/")
    return ("deny " if path.startswith("deny ") else "") + out


def by_kind(rules: dict[str, set[str]], base: str, name: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path, perms in rules.items():
        out.setdefault(kind(path, base, name), set()).update(perms)
    return out


def abstraction(path: Path) -> dict[str, set[str]]:
    return {k: v for k, v in parse(path.read_text()).items() if "*" not in k and "{" not in k}


def name_of(xml: str) -> str:
    name = etree.fromstring(xml.encode()).findtext("name")
    assert name
    return name


def compare(case: str, base: Path) -> dict[str, tuple[str, str]]:
    """The differences of one case: kind → (our permissions, libvirt's); '' = deny-only."""
    xml = prepare(case, base)
    golden = (DATA / f"{case}.golden").read_text().replace("@DIR@", str(base))
    ours = parse(golden.split(f"\n# {base}/profiles/vmconfine-")[0])
    proc = subprocess.run([VIRT_AA_HELPER, "-d", "-r", "-u", f"libvirt-{uuid_of(xml)}"],
                          input=xml, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        assert "skipped restricted file" in proc.stderr, proc.stderr
        return {"<refused>": ("", "")}
    theirs = parse(proc.stderr)
    # a path either side's per-domain rules name also gets what each side's abstractions grant
    named = set(ours) | set(theirs)
    for rules, extra in ((ours, abstraction(VMCONFINE_ABSTRACTION)),
                         (theirs, {**abstraction(BASE_ABSTRACTION),
                                   **{p: set(v) for p, v in LIBVIRT_QEMU_ABSTRACTION.items()}})):
        for path, perms in extra.items():
            if path in named:
                rules.setdefault(path, set()).update(perms)
    name = name_of(xml)
    mine, libvirt = by_kind(ours, str(base), name), by_kind(theirs, str(base), name)
    diffs: dict[str, tuple[str, str]] = {}
    for key in sorted(set(mine) | set(libvirt)):
        if key.startswith("deny "):
            # a deny only matters where the other side grants what it denies: ours on a path
            # libvirt does not let QEMU write is equal (it only silences the audit log)
            plain = key[5:]
            if key in libvirt and key not in mine and "w" in mine.get(plain, set()):
                diffs[plain] = ("no deny", "deny w")
            elif key in mine and key not in libvirt and "w" in libvirt.get(plain, set()):
                diffs[plain] = ("deny w", "no deny")
            continue
        if key not in libvirt and key not in mine:
            continue
        a, b = mine.get(key), libvirt.get(key)
        if key in mine and key in libvirt and (a or set()) <= (b or set()):
            continue  # the same or narrower: what the issue asks for
        diffs[key] = (letters(a), letters(b))
    return diffs


def test_every_difference_is_listed_and_explained(tmp_path: Path) -> None:
    require(os.access(VIRT_AA_HELPER, os.X_OK), "virt-aa-helper is missing (apt-get install "
            "libvirt-daemon-driver-qemu)")
    require(BASE_ABSTRACTION.is_file(), "AppArmor's abstractions/base is missing (apt-get "
            "install apparmor)")
    seen: dict[str, set[str]] = {}
    unexplained = []
    for case in CASES:
        base = tmp_path / case
        base.mkdir()
        for key, (mine, theirs) in compare(case, base).items():
            entry = DIFFERENCES.get(key)
            if entry is None or case not in entry[3] or (mine, theirs) != entry[:2]:
                unexplained.append(f"{case}: {key}: ours {mine}, libvirt {theirs}")
            seen.setdefault(key, set()).add(case)
    assert unexplained == [], "\n".join(unexplained)
    # every listed difference still exists, in exactly the cases it names
    stale = {k: sorted(v[3] ^ seen.get(k, set())) for k, v in DIFFERENCES.items()
             if v[3] != seen.get(k, set())}
    assert stale == {}
    doc = (REPO / "docs" / "apparmor.md").read_text()
    section = doc.split("## Compared with virt-aa-helper", 1)
    assert len(section) == 2, "docs/apparmor.md has no 'Compared with virt-aa-helper' section"
    assert [k for k in DIFFERENCES if f"`{k}`" not in section[1]] == []
