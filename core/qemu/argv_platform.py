"""The guest-platform half of the QEMU command line (see :mod:`vmconfine.qemu.argv`): vCPUs and
their model (``-smp``, ``-cpu``), the RTC (``-rtc``), ACPI suspend (``<pm>``), guest RAM (``-m``
and a hugetlbfs memory backend) and the watchdog (``-device`` + ``-action watchdog=``).

Renderings follow libvirt 9.0's ``qemu_command.c`` (checked with ``virsh domxml-to-native``)
with these differences, on purpose:

- ``<cpu mode='host-model'>``: libvirt expands the host CPU into a named model plus features
  from its capability probe; vmconfine does not probe and asks QEMU for the most the
  accelerator offers (``-cpu host`` under KVM, ``-cpu max`` under TCG);
- ``<watchdog action='dump'>`` is refused: libvirt pauses the guest and writes a core dump
  itself, and vmconfine has no dump facility;
- ``-smp`` carries a topology only when the XML gives ``<topology>``;
- ``-action watchdog=X`` (QEMU 6.0+) instead of the deprecated ``-watchdog-action X``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vmconfine.qemu.argv_devices import UnsupportedConfigError

if TYPE_CHECKING:
    from vmconfine.qemu.argv_devices import Builder

#: <watchdog model=...> → QEMU device (itco is built into Q35's ICH9 LPC bridge)
WATCHDOG_DEVICES = {"i6300esb": "i6300esb", "ib700": "ib700"}
#: QEMU's -action watchdog= values for libvirt's actions
WATCHDOG_ACTIONS = {"reset": "reset", "shutdown": "shutdown", "poweroff": "poweroff",
                    "pause": "pause", "none": "none", "inject-nmi": "inject-nmi"}
#: the RAM backend id libvirt gives x86 machines (``-machine memory-backend=pc.ram``)
RAM_ID = "pc.ram"


def smp(b: Builder) -> str:
    """``-smp`` value: current vCPUs, ``maxcpus`` when some start offline, the topology."""
    domain = b.domain
    current = domain.vcpus_current or domain.vcpus
    value = str(current)
    if current != domain.vcpus:
        value += f",maxcpus={domain.vcpus}"
    topo = domain.cpu.topology if domain.cpu is not None else {}
    if topo:
        total = math.prod(topo.values())
        if total != domain.vcpus:
            raise UnsupportedConfigError(
                f"CPU topology doesn't match maximum vcpu count: {total} vCPUs from "
                f"<topology> but <vcpu>{domain.vcpus}</vcpu>; make them agree"
            )
        value += "".join(f",{k}={topo[k]}" for k in ("sockets", "dies", "cores", "threads")
                         if k in topo)
    return value


#: libvirt's order of the Hyper-V CPU properties (its enum order)
HYPERV_ORDER = ("relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer", "reset",
                "vendor_id", "frequencies", "reenlightenment", "tlbflush", "ipi", "evmcs")


def hyperv_flags(b: Builder) -> list[str]:
    """``hv-*`` CPU properties: the ``hypervclock`` timer, then ``<hyperv>`` features in
    document order (libvirt 9.0's spelling: ``hv-spinlocks=0x1fff``, ``hv-vendor-id=X``)."""
    flags = [f"hv-time={'on' if t.present else 'off'}" for t in b.domain.clock.timers
             if t.name == "hypervclock" and t.present is not None]
    order = {name: i for i, name in enumerate(HYPERV_ORDER)}
    for name, value in sorted(b.domain.hyperv, key=lambda f: order.get(f[0], len(order))):
        prop = "hv-" + name.replace("_", "-")
        if name == "spinlocks" and value != "off":
            flags.append(f"{prop}={int(value):#x}")
        elif name == "vendor_id" and value != "off":
            flags.append(f"{prop}={value}")
        elif value == "on" or name not in ("spinlocks", "vendor_id"):
            flags.append(f"{prop}={value}")
    return flags


def cpu_model(b: Builder) -> str | None:
    """``-cpu`` value for ``<cpu>`` and the Hyper-V enlightenments, or None for QEMU's default
    model."""
    model = _cpu_model(b)
    hv = hyperv_flags(b)
    if not hv:
        return model
    if model is None:  # the default model, written out to carry the flags (as libvirt)
        model = "qemu32" if b.arch == "i686" else "qemu64"
    return ",".join([model, *hv])


def _cpu_model(b: Builder) -> str | None:
    cpu = b.domain.cpu
    kvm = b.domain.virt_type == "kvm"
    if cpu is None or (cpu.mode == "custom" and cpu.model is None and not cpu.features):
        return None  # the emulator's default model (qemu32 / qemu64), as libvirt
    if cpu.mode == "host-passthrough":
        if not kvm:
            raise UnsupportedConfigError(
                f"CPU mode 'host-passthrough' for {b.arch} qemu domain is not supported by "
                f"hypervisor (it needs KVM); use type='kvm' or <cpu mode='custom'><model>"
            )
        return "host,migratable=on"
    if cpu.mode == "host-model":
        return "host" if kvm else "max"
    if cpu.mode == "maximum":
        return "max"
    if cpu.model is None:
        raise UnsupportedConfigError(
            "Non-empty feature list specified without CPU model; add <model>NAME</model>"
        )
    flags = [f"{name}={'off' if policy in ('disable', 'forbid') else 'on'}"
             for name, policy in cpu.features]
    return ",".join([cpu.model.replace(",", ",,"), *flags])


def add_cpu(b: Builder) -> None:
    """``-cpu`` when the domain asks for a model."""
    model = cpu_model(b)
    if model is not None:
        b.add("-cpu", model)


#: <timer name='rtc' track=...> → -rtc clock=
RTC_TRACK = {"guest": "vm", "wall": "host", "realtime": "rt"}
#: <timer name='pit' tickpolicy=...> → kvm-pit.lost_tick_policy
PIT_POLICY = {"delay": "delay", "catchup": "slew", "discard": "discard"}


def add_rtc(b: Builder) -> None:
    """``-rtc base=utc|localtime[,clock=..][,driftfix=slew]`` for ``<clock>`` (``base=utc``
    without one, as libvirt), then the PIT and HPET timers, as libvirt's
    qemuBuildClockCommandLine."""
    clock = b.domain.clock
    if clock.offset not in ("utc", "localtime"):
        raise UnsupportedConfigError(
            f"clock offset '{clock.offset}' is not supported; use offset='utc' or "
            f"offset='localtime'"
        )
    rtc = f"base={clock.offset}"
    extra: list[str] = []
    for timer in clock.timers:
        if timer.name == "rtc":
            if timer.track is not None:
                if timer.track not in RTC_TRACK:
                    raise UnsupportedConfigError(f"unsupported rtc timer track '{timer.track}'")
                rtc += f",clock={RTC_TRACK[timer.track]}"
            if timer.tickpolicy == "catchup":
                rtc += ",driftfix=slew"
            elif timer.tickpolicy not in (None, "delay"):
                raise UnsupportedConfigError(
                    f"unsupported rtc timer tickpolicy '{timer.tickpolicy}'; use delay or "
                    f"catchup"
                )
        elif timer.name == "pit" and timer.tickpolicy is not None:
            if timer.tickpolicy not in PIT_POLICY:
                raise UnsupportedConfigError(
                    f"unsupported pit tickpolicy '{timer.tickpolicy}'; use delay, catchup or "
                    f"discard"
                )
            extra += ["-global", f"kvm-pit.lost_tick_policy={PIT_POLICY[timer.tickpolicy]}"]
        elif timer.name == "hpet" and timer.present is False:
            extra.append("-no-hpet")
    b.add("-rtc", rtc, *extra)


#: the ACPI power-management device whose S3/S4 support ``<pm>`` switches, per machine
PM_DEVICES = {True: "ICH9-LPC", False: "PIIX4_PM"}


def add_pm(b: Builder) -> None:
    """``<pm><suspend-to-mem|suspend-to-disk enabled>``: ``-global DEV.disable_s3=0|1`` (and
    ``disable_s4``) on the machine's ACPI device, as libvirt's qemuBuildPMCommandLine."""
    pm = b.domain.pm
    if not pm:
        return
    if b.arch not in ("x86_64", "i686"):
        raise UnsupportedConfigError("<pm> suspend settings are implemented for x86 machines "
                                     "only; remove <pm>")
    dev = PM_DEVICES[b.q35]
    for key in ("s3", "s4"):
        if key in pm:
            b.add("-global", f"{dev}.disable_{key}={0 if pm[key] else 1}")


def memory_backend(b: Builder, hugepage_dir: str | None) -> dict[str, Any] | None:
    """The ``memory-backend-file`` object of a guest whose RAM comes from hugetlbfs."""
    backing = b.domain.memory_backing
    if backing is None or not backing.hugepages:
        return None
    if hugepage_dir is None:
        raise UnsupportedConfigError(
            "<memoryBacking><hugepages/> needs a hugetlbfs mount: none is mounted (mount -t "
            "hugetlbfs hugetlbfs /dev/hugepages, reserve pages with sysctl vm.nr_hugepages) "
            "or hugetlbfs_mount in qemu.conf names none"
        )
    return {"qom-type": "memory-backend-file", "id": RAM_ID, "mem-path": hugepage_dir,
            "prealloc": True, "size": math.ceil(b.domain.memory_kib / 1024) * 1024 * 1024}


def add_watchdogs(b: Builder) -> None:
    """The watchdog device and what QEMU does when it fires."""
    dogs = b.domain.watchdogs
    if len(dogs) > 1:
        raise UnsupportedConfigError("only one <watchdog> is supported; remove the others")
    for i, dog in enumerate(dogs):
        if dog.action not in WATCHDOG_ACTIONS:
            raise UnsupportedConfigError(
                f"watchdog action '{dog.action}' is not supported (vmconfine writes no core "
                f"dumps); use one of {', '.join(WATCHDOG_ACTIONS)}"
            )
        if dog.model == "itco":
            if not b.q35:
                raise UnsupportedConfigError(
                    f"the iTCO watchdog is built into Q35 machines; machine '{b.machine}' "
                    f"has none (use model='i6300esb')"
                )
            b.add("-global", "ICH9-LPC.noreboot=off")
        elif dog.model in WATCHDOG_DEVICES:
            if dog.model == "ib700" and b.arch not in ("x86_64", "i686"):
                raise UnsupportedConfigError("the ib700 watchdog is an x86 ISA device")
            b.device({"driver": WATCHDOG_DEVICES[dog.model], "id": f"watchdog{i}"},
                     dog.element)
        else:
            raise UnsupportedConfigError(
                f"watchdog model '{dog.model}' is not supported here; use i6300esb, ib700 or "
                f"itco (Q35)"
            )
        b.add("-action", f"watchdog={WATCHDOG_ACTIONS[dog.action]}")
