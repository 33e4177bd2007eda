"""Run code under a kernel that enforces AppArmor or SELinux: the lsm test tier.

The host kernel enforces neither LSM, so this tier boots Debian 12's kernel under QEMU TCG
(``-accel tcg``; KVM cannot boot a Linux guest on the CI machines) with the host's ``/`` shared
read-only over 9p, runs a command as root inside, and hands back its exit status, the console
output and a results directory. ``scripts/lsm-prepare.sh`` builds what is booted (kernel,
initramfs, private SELinux policy) into the cache dir; ``docs/lsm-tier.md`` explains the design.

API
---
``run_in_guest(lsm, test_path, *, timeout=240, extra_env=None, pytest_args=(), results_dir=None,
kernel=None, memory_mib=512, writable=DEFAULT_WRITABLE, usb=False) -> GuestResult``
    Boot a kernel with ``lsm`` ("apparmor" or "selinux") enforcing and run
    ``<repo>/.venv/bin/python -m pytest -p no:cacheprovider -m lsm_guest <test_path>`` inside it,
    from the checkout, as root. ``test_path`` is a path (absolute, or relative to the checkout)
    plus an optional ``::node`` suffix. Guest test modules mark their tests ``lsm_guest``; those
    are never run on the host. pytest's JUnit XML lands in ``results_dir/junit.xml``.

``run_script_in_guest(lsm, script, *, ...same keywords...) -> GuestResult``
    The primitive underneath: run a ``/bin/sh`` script text instead of pytest.

Keywords: ``timeout`` (seconds for the whole boot; QEMU is killed at the deadline),
``extra_env`` (exported in the guest), ``pytest_args`` (appended before the path),
``results_dir`` (host dir shared read-write; default a fresh ``/tmp/vmconfine-lsm-*`` that the
caller removes, so pass pytest's ``tmp_path``), ``kernel`` (a ``GuestKernel``; default read from
the cache), ``memory_mib`` (guest RAM), ``writable`` (top-level dirs given a RAM overlay; add
e.g. ``"work"`` to make the checkout writable, inside the guest only), ``usb`` (give the guest an
xHCI controller with an emulated USB keyboard, ``USB_DEVICE`` ids: a real USB device for the
guest kernel, ``/dev/bus/usb/001/002``, that the USB hostdev hotplug test passes on).

Typical use from a host-side test (the ``guest_kernel`` fixture is in tests/lsm/conftest.py)::

    @pytest.mark.lsm
    def test_profile_confines(guest_kernel, tmp_path):
        result = run_in_guest("apparmor", "tests/lsm/guest_apparmor.py",
                              kernel=guest_kernel, results_dir=tmp_path)
        assert result.exit_code == 0, result.tail()

``GuestResult(exit_code, output, results_dir, timed_out)``
    ``exit_code`` is the guest command's status, or ``EXIT_TIMEOUT`` (124: QEMU was killed at
    the deadline) or ``EXIT_NO_STATUS`` (125: the guest ended without reporting one, e.g. a
    panic or a QEMU error; see ``output``). ``output`` is the serial console (kernel messages at
    loglevel <= 3, the command's stdout and stderr), ``results_dir`` the host directory the guest
    saw read-write at ``/run/out``. ``tail()`` gives the last lines for assertion messages,
    ``outcomes()`` maps JUnit test names to "passed"/"failed"/"skipped"/"error".

``GuestKernel.load(cache=None)`` reads the cache manifest (``VMCONFINE_LSM_CACHE`` or
``/var/cache/vmconfine-lsm``); it raises ``GuestSetupError`` with the fix when it is missing.

Inside the guest
----------------
* ``/`` is the host root, read-only; ``/etc /var /tmp /root`` are RAM overlays (writes vanish
  at power-off); ``/run`` is a tmpfs; ``/run/out`` is ``results_dir`` (read-write, on the host).
* The environment is clean apart from ``VMCONFINE_IN_GUEST=1``, ``VMCONFINE_LSM=<lsm>``,
  ``VMCONFINE_GUEST_RESULTS=/run/out``, ``VMCONFINE_SELINUX_ROOT`` (the private policy root),
  ``VMCONFINE_REQUIRE_ALL`` (copied from the host when set), ``PYTHONDONTWRITEBYTECODE=1`` and
  ``extra_env``. The working directory is the checkout.
* AppArmor: securityfs is at ``/sys/kernel/security``; ``apparmor_parser -r`` loads profiles.
* SELinux: before the command runs, the private policy (stock refpolicy plus the harness-only
  ``tests/lsm/guest/lsmtest.cil``) is copied to ``/etc/selinux/default``, loaded with
  ``load_policy`` and switched to enforcing. The command runs as ``kernel_t``; files on the 9p
  root are ``unlabeled_t``, so files a test labels must live on tmpfs (``/run``).
* Audit records (AVC denials, ``apparmor="DENIED"``) are in ``dmesg``; the rate limit is off.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from base64 import b64encode
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO
from vmconfine.errors import VmconfineError

LSMS = ("apparmor", "selinux")
DEFAULT_CACHE = Path("/var/cache/vmconfine-lsm")
DEFAULT_WRITABLE = ("etc", "var", "tmp", "root")
EXIT_TIMEOUT = 124
#: guest vCPUs: TCG runs one host thread per vCPU (multi-threaded TCG), so a guest that runs
#: nested QEMUs and pytest gets both cores of a 2-core CI machine
GUEST_CPUS = max(1, min(2, os.cpu_count() or 1))
EXIT_NO_STATUS = 125
# Exit status of the SELinux set-up step in the guest when loading the private policy fails.
EXIT_POLICY_LOAD = 97
GUEST_RESULTS = "/run/out"
QEMU = "qemu-system-x86_64"
#: SELinux guests: this emulator path is bound to a copy labelled as the policy says (qemu_exec_t)
EMULATOR = "/usr/bin/qemu-system-x86_64"
#: likewise the TPM emulator (swtpm_exec_t, from vmconfine's shipped module vmconfine_swtpm.cil)
SWTPM = "/usr/bin/swtpm"
EMULATOR_DIR = "/run/vmconfine-emulator"
#: swtpm-tools' local CA (SELinux guests: a copy on that tmpfs, bound over it)
LOCALCA = "/var/lib/swtpm-localca"
#: vendor and product ids of the emulated USB device a ``usb=True`` guest has (QEMU's usb-kbd)
USB_DEVICE = (0x0627, 0x0001)

_KERNEL_ARGS = {
    "apparmor": "apparmor=1 security=apparmor",
    # Boot permissive with no policy; the guest loads the private policy, then setenforce 1.
    "selinux": "security=selinux selinux=1 enforcing=0",
}
_EXIT_RE = re.compile(r"LSMPROBE_EXIT=(\d+)")
_ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class GuestSetupError(VmconfineError):
    """The lsm guest cannot be booted (cache missing, QEMU missing, bad argument)."""


def cache_dir() -> Path:
    """The lsm cache dir: ``$VMCONFINE_LSM_CACHE`` or /var/cache/vmconfine-lsm."""
    return Path(os.environ.get("VMCONFINE_LSM_CACHE") or DEFAULT_CACHE)


@dataclass(frozen=True)
class GuestKernel:
    """What scripts/lsm-prepare.sh built: kernel, initramfs and the private SELinux policy."""

    cache: Path
    kver: str
    kernel: Path
    initrd: Path
    selinux_root: Path | None
    selinux_policy: Path | None

    @classmethod
    def load(cls, cache: Path | None = None) -> GuestKernel:
        """Read ``<cache>/manifest``; raise GuestSetupError naming the fix when it is unusable."""
        cache = cache or cache_dir()
        manifest = cache / "manifest"
        fix = f"run scripts/lsm-prepare.sh as root (VMCONFINE_LSM_CACHE={cache})"
        try:
            text = manifest.read_text()
        except OSError as exc:
            message = f"lsm guest manifest {manifest} unreadable: {exc.strerror}; {fix}"
            raise GuestSetupError(message) from exc
        values = dict(
            line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
        )
        kernel = Path(values.get("KERNEL", ""))
        initrd = Path(values.get("INITRD", ""))
        for what, path in (("kernel", kernel), ("initramfs", initrd)):
            if not path.is_file():
                raise GuestSetupError(f"lsm guest {what} {path} ({manifest}) is missing; {fix}")
        se_root = values.get("SELINUX_ROOT") or None
        se_policy = values.get("SELINUX_POLICY") or None
        return cls(
            cache=cache,
            kver=values.get("KVER", "?"),
            kernel=kernel,
            initrd=initrd,
            selinux_root=Path(se_root) if se_root else None,
            selinux_policy=Path(se_policy) if se_policy else None,
        )


@dataclass(frozen=True)
class GuestResult:
    """Outcome of one guest boot."""

    exit_code: int
    output: str
    results_dir: Path
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the guest command exited 0."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def junit_xml(self) -> Path:
        """Where run_in_guest asks pytest to write its JUnit XML."""
        return self.results_dir / "junit.xml"

    def tail(self, lines: int = 60) -> str:
        """The last ``lines`` console lines, prefixed with the exit status (for assert messages)."""
        state = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        body = "\n".join(self.output.splitlines()[-lines:])
        return f"guest {state}; console tail:\n{body}"

    def outcomes(self) -> dict[str, str]:
        """Map each JUnit test case name to passed/failed/error/skipped (empty without XML)."""
        if not self.junit_xml.is_file():
            return {}
        result: dict[str, str] = {}
        for case in ET.parse(self.junit_xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = "failed" if tag == "failure" else tag
                    break
            result[case.get("name", "?")] = outcome
        return result


def run_in_guest(
    lsm: str,
    test_path: str,
    *,
    timeout: float = 240,
    extra_env: Mapping[str, str] | None = None,
    pytest_args: Iterable[str] = (),
    results_dir: Path | None = None,
    kernel: GuestKernel | None = None,
    memory_mib: int = 512,
    writable: Iterable[str] = DEFAULT_WRITABLE,
    usb: bool = False,
) -> GuestResult:
    """Run the ``lsm_guest`` tests of ``test_path`` with pytest inside an ``lsm`` guest."""
    path_part, sep, node = test_path.partition("::")
    target = Path(path_part)
    if not target.is_absolute():
        target = REPO / target
    if not target.exists():
        raise GuestSetupError(f"guest test path {target} does not exist; pass one in the checkout")
    venv_python = REPO / ".venv" / "bin" / "python"
    python = venv_python if venv_python.exists() else Path(sys.executable)
    argv = [
        str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "lsm_guest",
        f"--junitxml={GUEST_RESULTS}/junit.xml", *pytest_args, f"{target}{sep}{node}",
    ]
    script = f"cd {shlex.quote(str(REPO))}\nexec {shlex.join(argv)}\n"
    return run_script_in_guest(
        lsm, script, timeout=timeout, extra_env=extra_env, results_dir=results_dir,
        kernel=kernel, memory_mib=memory_mib, writable=writable, usb=usb,
    )


def run_script_in_guest(
    lsm: str,
    script: str,
    *,
    timeout: float = 240,
    extra_env: Mapping[str, str] | None = None,
    results_dir: Path | None = None,
    kernel: GuestKernel | None = None,
    memory_mib: int = 512,
    writable: Iterable[str] = DEFAULT_WRITABLE,
    usb: bool = False,
) -> GuestResult:
    """Boot an ``lsm`` guest, run ``script`` with /bin/sh as root, return its result."""
    if lsm not in LSMS:
        raise GuestSetupError(f"unknown LSM {lsm!r} for the guest; use one of {', '.join(LSMS)}")
    kernel = kernel or GuestKernel.load()
    if lsm == "selinux" and kernel.selinux_root is None:
        raise GuestSetupError(
            f"no private SELinux policy in {kernel.cache}; install selinux-policy-default and "
            "policycoreutils, then run scripts/lsm-prepare.sh"
        )
    if results_dir is None:
        results_dir = Path(tempfile.mkdtemp(prefix="vmconfine-lsm-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    harness_dir = results_dir / ".harness"
    harness_dir.mkdir(exist_ok=True)
    (harness_dir / "run.sh").write_text(_guest_script(lsm, script, extra_env or {}, kernel))
    guest_cmd = f"exec /bin/sh {GUEST_RESULTS}/.harness/run.sh"
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=3",
        # TCG on a loaded host: the IO-APIC timer check can miss its ticks and panic the
        # guest ("IO-APIC + timer doesn't work"); the check proves nothing about the LSMs
        "no_timer_check",
        f"lsm_cmd={b64encode(guest_cmd.encode()).decode()}",
        _KERNEL_ARGS[lsm],
    ])
    rw = " ".join(writable)
    if rw != " ".join(DEFAULT_WRITABLE):
        if not all(_ENV_KEY_RE.fullmatch(d) for d in writable):
            raise GuestSetupError(f"writable dirs must be top-level names like 'etc', got {rw!r}")
        append += f' lsm_rw="{rw}"'
    argv = _qemu_argv(kernel, results_dir, append, memory_mib)
    if usb:
        argv += ["-device", "qemu-xhci,id=xhci", "-device", "usb-kbd,bus=xhci.0"]
    return _boot(argv, results_dir, timeout)


def _guest_script(lsm: str, script: str, extra_env: Mapping[str, str], kernel: GuestKernel) -> str:
    """The shell script the guest init runs: environment, LSM set-up, then ``script``."""
    env = {
        "VMCONFINE_IN_GUEST": "1",
        "VMCONFINE_LSM": lsm,
        "VMCONFINE_GUEST_RESULTS": GUEST_RESULTS,
        "VMCONFINE_SELINUX_ROOT": str(kernel.selinux_root or ""),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("VMCONFINE_REQUIRE_ALL"):
        env["VMCONFINE_REQUIRE_ALL"] = os.environ["VMCONFINE_REQUIRE_ALL"]
    for key, value in extra_env.items():
        if not _ENV_KEY_RE.fullmatch(key):
            raise GuestSetupError(f"extra_env key {key!r} is not a shell variable name")
        env[key] = str(value)
    lines = ["#!/bin/sh", "# written by tests/lsm/harness.py; runs as root inside the guest"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    if lsm == "selinux":
        src = shlex.quote(f"{kernel.selinux_root}/etc/selinux/default")
        programs = " ".join(shlex.quote(p) for p in (EMULATOR, SWTPM))
        lines += [
            "# The emulator on the 9p root is unlabeled_t like every file there. Give the guest",
            "# the context the policy's file_contexts assign to it (qemu_exec_t: the entry point",
            "# of the sVirt domains) on a copy on a RAM tmpfs, bound over the original path; the",
            "# same for swtpm (swtpm_exec_t, vmconfine's module), when it is installed.",
            "vmconfine_selinux_emulator() {",
            f"  mkdir -p {EMULATOR_DIR} || return 1",
            f"  mount -t tmpfs -o mode=755 vmconfine-emulator {EMULATOR_DIR} || return 1",
            f"  for prog in {programs}; do",
            f'    [ "$prog" = {shlex.quote(EMULATOR)} ] || [ -e "$prog" ] || continue',
            '    con=$(matchpathcon -n "$prog") || return 1',
            f'    copy={EMULATOR_DIR}/$(basename "$prog")',
            '    cp "$prog" "$copy" && chcon "$con" "$copy" || return 1',
            '    mount --bind "$copy" "$prog" || return 1',
            "  done",
            "  # swtpm_setup's local CA (swtpm_localca, run as tss) creates its lock file and",
            "  # certificates in /var/lib/swtpm-localca. On the /var overlay over the unlabelled",
            "  # 9p root a file created there is unlabeled_t, which the policy keeps off the",
            "  # overlay's tmpfs (a host has that directory labelled): a copy on the tmpfs,",
            "  # bound over it.",
            f"  if [ -d {LOCALCA} ]; then",
            f"    cp -R --preserve=mode,ownership,timestamps {LOCALCA} {EMULATOR_DIR}/localca &&",
            f"      mount --bind {EMULATOR_DIR}/localca {LOCALCA} || return 1",
            "  fi",
            "  # devtmpfs was mounted before the policy was loaded; a real system's init labels",
            "  # these nodes (null_device_t, random_device_t, ...), and QEMU opens them",
            "  restorecon /dev/null /dev/zero /dev/random /dev/urandom",
            "}",
            "# load the private policy (stock refpolicy + lsmtest.cil), then enforce",
            "vmconfine_selinux_setup() {",
            "  mkdir -p /etc/selinux/default || return 1",
            "  echo SELINUX=permissive > /etc/selinux/config || return 1",
            "  echo SELINUXTYPE=default >> /etc/selinux/config || return 1",
            f"  cp -R {src}/. /etc/selinux/default/ || return 1",
            "  load_policy || return 1",
            "  vmconfine_selinux_emulator || return 1",
            "  setenforce 1 || return 1",
            '  [ "$(cat /sys/fs/selinux/enforce)" = 1 ]',
            "}",
            "vmconfine_selinux_setup || {",
            '  echo "vmconfine-guest: loading the private SELinux policy failed"',
            f"  exit {EXIT_POLICY_LOAD}",
            "}",
        ]
    lines += ["# --- command ---", script]
    return "\n".join(lines) + "\n"


def _qemu_argv(kernel: GuestKernel, results_dir: Path, append: str, memory_mib: int) -> list[str]:
    root = "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
    out = f"local,id=out,path={results_dir},security_model=none"
    if "," in str(results_dir):
        raise GuestSetupError(f"results dir {results_dir} contains a comma, which QEMU cannot take")
    return [
        QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", str(GUEST_CPUS),
        "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel.kernel), "-initrd", str(kernel.initrd),
        "-fsdev", root, "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", out, "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        "-append", append,
    ]


def _boot(argv: list[str], results_dir: Path, timeout: float) -> GuestResult:
    """Run QEMU with no tty or stdin, bounded by ``timeout``; parse LSMPROBE_EXIT=."""
    console = results_dir / "console.log"
    timed_out = False
    with console.open("wb") as log:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise GuestSetupError(
                f"{QEMU} not found; install: apt-get install -y --no-install-recommends "
                "qemu-system-x86"
            ) from exc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, or SIGTERM from scripts/test.sh via the conftest): the guest
            # is in its own session, so nothing else would stop it.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    text = console.read_bytes().decode("utf-8", "replace").replace("\r", "")
    text = _ANSI_RE.sub("", text)
    statuses = _EXIT_RE.findall(text)
    if timed_out:
        code = EXIT_TIMEOUT
        text += f"\n[vmconfine harness: guest killed after the {timeout:g} s timeout]\n"
    elif statuses:
        code = int(statuses[-1])
    else:
        code = EXIT_NO_STATUS
        text += f"\n[vmconfine harness: no LSMPROBE_EXIT status; QEMU exited {proc.returncode}]\n"
    return GuestResult(exit_code=code, output=text, results_dir=results_dir, timed_out=timed_out)
