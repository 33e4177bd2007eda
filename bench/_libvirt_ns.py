"""Run libvirtd and virtlogd in a private mount namespace, under a prompt-reaping subreaper.

Started by :mod:`bench.libvirt_peer` as
``unshare -m --propagation private python3 _libvirt_ns.py STATE_DIR CACHE_DIR USER``. It bind-mounts
``STATE_DIR/{etc,run,lib,log}`` over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``CACHE_DIR`` over ``/var/cache/libvirt`` (so nothing of the host's
libvirt state is read or written), becomes a child subreaper (QEMU, which libvirtd daemonizes,
is reaped at once instead of by a slow PID 1), starts ``virtlogd`` and ``libvirtd`` in the
foreground, and reaps every child until SIGTERM, which it forwards to both daemons.

Stdlib only: it runs under the system Python.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
MOUNTS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
          ("log", "/var/log/libvirt"))


def main() -> int:
    state, cache, qemu_user = sys.argv[1], sys.argv[2], sys.argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write("prctl(PR_SET_CHILD_SUBREAPER) failed\n")
        return 1
    for sub, target in [*MOUNTS, ("", "/var/cache/libvirt")]:
        source = os.path.join(state, sub) if sub else cache
        subprocess.run(["mount", "--bind", source, target], check=True)
    _account_alias(state, qemu_user)
    log = open(os.path.join(state, "daemons.log"), "ab")
    env = dict(os.environ, LIBVIRT_LOG_OUTPUTS="3:stderr")
    daemons = [
        subprocess.Popen(["/usr/sbin/virtlogd"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, env=env),
    ]
    time.sleep(0.05)
    daemons.append(subprocess.Popen(["/usr/sbin/libvirtd"], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env))
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for d in reversed(daemons):
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with open(os.path.join(state, "daemons.pid"), "w") as fh:
        fh.write(" ".join(str(d.pid) for d in daemons) + "\n")
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            return 0 if stopping else 1
        except InterruptedError:
            continue
        for d in daemons:
            if d.pid == pid:
                d.returncode = 0
        if all(d.returncode is not None for d in daemons):
            if not stopping:
                sys.stderr.write("libvirt daemons exited on their own; see daemons.log\n")
            _kill_orphans()
            return 0 if stopping else 1


def _account_alias(state: str, qemu_user: str) -> None:
    """libvirtd resolves its compiled-in default account ``libvirt-qemu`` before it reads
    qemu.conf. Debian creates that account with libvirt-daemon-system; here it is an alias of
    vmconfine's QEMU account, visible in this mount namespace only (copies of /etc/passwd and
    /etc/group bind-mounted over the real ones)."""
    import grp
    import pwd

    pw = pwd.getpwnam(qemu_user)
    for name, line in (("passwd", f"libvirt-qemu:x:{pw.pw_uid}:{pw.pw_gid}:libvirt QEMU "
                                  f"(bench alias):/var/lib/libvirt:/usr/sbin/nologin\n"),
                       ("group", f"libvirt-qemu:x:{grp.getgrgid(pw.pw_gid).gr_gid}:\n")):
        with open(f"/etc/{name}") as fh:
            text = fh.read()
        if not text.endswith("\n"):
            text += "\n"
        copy = os.path.join(state, name)
        with open(copy, "w") as fh:
            fh.write(text + line)
        subprocess.run(["mount", "--bind", copy, f"/etc/{name}"], check=True)


def _kill_orphans() -> None:
    """SIGKILL and reap the children still left (QEMUs reparented to this subreaper)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if ppid == me:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return

if __name__ == "__main__":
    sys.exit(main())
