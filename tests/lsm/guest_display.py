"""Guest side: SPICE and UEFI firmware under an enforcing LSM (AppArmor boot and first SELinux
boot; one paused QEMU per boot).

A q35 domain as virt-install writes it with ``--graphics spice --boot uefi``: ``<os
firmware='efi'>`` (Debian's OVMF, picked from QEMU's firmware descriptors, the NVRAM made from
its template), ``<graphics type='spice'>`` on a unix socket (``<listen type='socket'/>``: the
path is generated in the domain's home directory, where QEMU 7.2 creates the socket itself — its
``-spice`` takes no descriptor), a ``spicevmc`` agent channel, QXL video and a ``spicevmc`` USB
redirection, started with ``vmconfine run --paused`` under ``security_driver = "<lsm>"``.
Checked:

* QEMU runs in the domain's label (AppArmor: its per-UUID profile, enforce; SELinux: the live
  XML's ``svirt_t`` label, the kernel enforcing);
* ``query-spice``: enabled, on the generated socket; a client on the socket gets ``REDQ``;
* QMP's ``query-block``: flash0 is the OVMF code read-only, flash1 the domain's NVRAM
  read-write;
* AppArmor: the profile's own rules for these paths are exactly the NVRAM ``rwk`` and the home
  directory (where the socket is), and the OVMF code is read (``rk``, never ``w``) through the
  shipped abstraction's one OVMF rule; SELinux: the NVRAM and the socket carry the domain's
  image label, the firmware is not relabelled;
* a compromised QEMU (QMP ``blockdev-add``, read-only) opens its own NVRAM and is refused
  another domain's NVRAM (made from the same template, same owner and mode; SELinux: another
  domain's image label), and the denial is the LSM's; control: the same request by the same
  QEMU succeeds once the LSM stops enforcing for it (AppArmor: its profile reloaded in complain
  mode; SELinux: permissive), so the check can fail;
* after ``destroy``: no QEMU, no profile, the NVRAM kept.

Observations go to ``$VMCONFINE_GUEST_RESULTS/display-<lsm>.json``; the host side asserts them
again (the same ``e2e_checks.assert_display``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host.conftest import wait_for_line
from tests.host.test_landlock_readonly import Qmp
from tests.host.test_spice import link, unix
from tests.lsm.e2e_checks import OVMF_CODE as LOADER
from tests.lsm.e2e_checks import assert_display
from tests.lsm.guest_e2e import (
    START_TIMEOUT,
    Instance,
    attr_current,
    denials,
    gone,
    live_labels,
    loaded_profiles,
    started_pid,
    work,  # noqa: F401 (fixture: /run/vmconfine-e2e, SELinux's execmem boolean on)
)
from vmconfine.config.instance import open_instance
from vmconfine.qemu.qmp import START_TIMEOUT_ENV

pytestmark = pytest.mark.lsm_guest

LSM = os.environ.get("VMCONFINE_LSM", "")
RESULTS = Path(os.environ.get("VMCONFINE_GUEST_RESULTS", "/run/out"))
TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
NAME = "spice-efi"
XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='qemu-xhci'/>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <graphics type='spice'><listen type='socket'/><image compression='off'/></graphics>
    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'
                  primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def record(seen: dict[str, Any]) -> None:
    (RESULTS / f"display-{LSM}.json").write_text(json.dumps(seen, indent=1, sort_keys=True))


def getfilecon(path: Path) -> str:
    import selinux

    return str(selinux.lgetfilecon_raw(str(path))[1])


def other_level(label: str) -> str:
    """An MCS pair that is not the one of ``label`` (another domain's)."""
    return "s0:c1,c2" if not label.endswith(":s0:c1,c2") else "s0:c3,c4"


def profile_rules(files: str, *paths: str) -> list[str]:
    """The lines of a profile's ``.files`` include that name one of ``paths``."""
    return sorted(ln.strip() for ln in files.splitlines()
                  if any(f'"{p}' in ln for p in paths))


@contextlib.contextmanager
def labelled_firmware() -> Iterator[None]:
    """SELinux: the OVMF code labelled as a host's policy labels it. Everything on the guest's
    9p root is ``unlabeled_t``, which the harness lets ``svirt_t`` read but not lock (QEMU locks
    its flash images: "Failed to lock byte 100"); a host's ``/usr/share/OVMF`` is ``usr_t``,
    which refpolicy lets ``svirt_t`` read and lock. So, as the harness does for the emulator: a
    copy on tmpfs with the context ``matchpathcon`` gives the path, bind-mounted over it."""
    if LSM != "selinux":
        yield
        return
    import selinux

    copy = Path("/run/vmconfine-ovmf") / Path(LOADER).name
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(LOADER, copy)
    selinux.setfilecon_raw(str(copy), selinux.matchpathcon(LOADER, 0)[1])
    subprocess.run(["mount", "--bind", str(copy), LOADER], check=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run(["umount", LOADER], check=True, timeout=60)
        shutil.rmtree(copy.parent)


def relax(profile_dir: Path, profile: str) -> str:
    """Stop the LSM from enforcing on the running QEMU (the control); return the new mode."""
    if LSM == "selinux":
        subprocess.run(["setenforce", "0"], check=True, timeout=60)
        return Path("/sys/fs/selinux/enforce").read_text().strip()
    from vmconfine_aa_helper.files import include_dirs

    includes = [arg for d in include_dirs(str(profile_dir)) for arg in ("-I", d)]
    subprocess.run(["/sbin/apparmor_parser", "-r", "-C", *includes, str(profile_dir / profile)],
                   check=True, capture_output=True, timeout=120)
    return next(ln.rsplit(" (", 1)[1].rstrip(")") for ln in
                Path("/sys/kernel/security/apparmor/profiles").read_text().splitlines()
                if ln.rsplit(" (", 1)[0] == profile)


def test_spice_and_efi_under_the_lsm(work: Path) -> None:  # noqa: F811 (the fixture)
    began = time.monotonic()
    base = work / "display"
    base.mkdir()
    inst = Instance(base / "inst", LSM)
    uuid = str(uuidlib.uuid4())
    xml = base / f"{NAME}.xml"
    xml.write_text(XML.format(name=NAME, uuid=uuid))
    nvram_dir = inst.root / "lib" / "qemu" / "nvram"
    nvram, other = nvram_dir / f"{NAME}_VARS.fd", nvram_dir / "other_VARS.fd"
    home = inst.root / "lib" / "qemu" / f"domain-{NAME}"
    sock = home / "spice.sock"
    seen: dict[str, Any] = {"lsm": LSM, "paths": {"nvram": str(nvram), "home": str(home),
                                                  "sock": str(sock)}}
    firmware = contextlib.ExitStack()
    try:
        firmware.enter_context(labelled_firmware())
        # QEMU with its SPICE, QXL and USB redirection modules loaded over 9p under TCG can
        # take longer than the 30 s QMP handshake limit in a busy guest (measured: 28 s for
        # -spice alone at a host load average of 7): the limit is raised for this start
        run = inst.run(xml, env={START_TIMEOUT_ENV: str(START_TIMEOUT)}, extra=("--paused",))
        pid = started_pid(wait_for_line(run, "started", timeout=START_TIMEOUT))
        label, imagelabel = live_labels(inst.cli("dumpxml", NAME))
        # another domain's NVRAM: the same template, the same owner and mode as this one's
        nvram_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATE, other)
        st = os.stat(nvram)
        os.chown(other, st.st_uid, st.st_gid)
        os.chmod(other, st.st_mode & 0o7777)
        if LSM == "selinux":
            import selinux

            selinux.setfilecon_raw(str(other), imagelabel.rsplit(":", 2)[0] + ":"
                                   + other_level(imagelabel))
        seen.update(label=label, imagelabel=imagelabel, current=attr_current(pid))
        if LSM == "selinux":
            seen["enforce"] = Path("/sys/fs/selinux/enforce").read_text().strip()
            seen["contexts"] = {"nvram": getfilecon(nvram), "socket": getfilecon(sock),
                                "loader": getfilecon(Path(LOADER)),
                                "other": getfilecon(other)}
        else:
            files = (inst.root / "profiles" / f"{label}.files").read_text()
            from vmconfine_aa_helper.files import shipped_dir

            # the firmware is the shipped abstraction's (as libvirt's libvirt-qemu): read, lock
            abstraction = Path(shipped_dir(), "abstractions", "vmconfine-qemu").read_text()
            seen["abstraction_ovmf"] = sorted(ln.strip() for ln in abstraction.splitlines()
                                              if "/OVMF" in ln and not ln.strip().startswith("#"))
            seen["rules"] = {"loader": profile_rules(files, LOADER),
                             "nvram": profile_rules(files, str(nvram_dir)),
                             "home": profile_rules(files, str(home)),
                             "spice": profile_rules(files, str(sock))}
        qmp = Qmp(inst, NAME)  # type: ignore[arg-type]  (an embed instance, as Embed)
        try:
            spice = qmp.cmd("query-spice")["return"]
            seen["spice"] = {k: spice.get(k) for k in ("enabled", "host", "port", "auth")}
            with unix(sock) as s:
                seen["link_magic"] = link(s)[0].decode()
            seen["flash"] = {b["qdev"].rsplit(".", 1)[-1]: [b["inserted"]["file"],
                                                            b["inserted"]["ro"]]
                             for b in qmp.cmd("query-block")["return"]
                             if "flash" in b.get("qdev", "")}
            seen["status"] = qmp.cmd("query-status")["return"]["status"]
            seen["opens"] = {"own_nvram": qmp.blockdev_add("own", nvram, read_only=True),
                             "other_nvram": qmp.blockdev_add("other", other, read_only=True)}
            seen["denials"] = [ln for ln in denials() if "other_VARS.fd" in ln]
            seen["relaxed"] = relax(inst.root / "profiles", label)
            try:
                seen["control"] = qmp.blockdev_add("control", other, read_only=True)
            finally:
                if LSM == "selinux":
                    subprocess.run(["setenforce", "1"], check=True, timeout=60)
        finally:
            qmp.close()
        stop = inst.cli("destroy", NAME)
        run.wait(timeout=START_TIMEOUT)
        seen["after"] = {"destroy": stop.returncode, "qemu_gone": gone(pid),
                         "profiles": loaded_profiles(), "nvram_kept": nvram.exists()}
    finally:
        inst.stop_all()
        firmware.close()
        if LSM == "selinux":
            subprocess.run(["setenforce", "1"], check=False, timeout=60)
        seen["seconds"] = round(time.monotonic() - began, 1)
        if "after" not in seen:  # what went wrong: QEMU's log, the LSM's last denials
            log = open_instance(inst.uri).log_path(NAME)
            seen["qemu_log"] = log.read_text()[-3000:] if log.exists() else None
            seen["last_denials"] = denials()[-20:]
        record(seen)
    assert_display(seen)

