#!/usr/bin/env bash
# Set up vmconfine on a fresh Debian 12 machine, as root: Debian packages, the dedicated QEMU
# account, /dev/kvm access, and the project's venv in .venv/ (from /usr/bin/python3 with
# --system-site-packages so Debian's selinux, LibAppArmor and capng bindings import).
# Idempotent; no tty or stdin needed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils            # the emulator and qemu-img
  ovmf                                  # UEFI firmware + its descriptors (<os firmware='efi'>)
  python3-venv python3-selinux python3-libapparmor python3-cap-ng
  python3-pyroute2                      # netlink: taps, bridges, macvtap (pyproject: pyroute2)
  apparmor                              # apparmor_parser (profiles compile on the host)
  attr acl                              # getfattr/setfattr for inspecting remembered owners
  libcap2-bin                           # setcap/getcap: file capabilities survive a domain
  busybox-static cpio kmod              # lsm test tier: initramfs of the booted kernel
  selinux-policy-default selinux-utils policycoreutils semodule-utils secilc checkpolicy
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # the peer: tests and benchmarks
  libvirt0                              # domain.rng, the schema of --validate
  util-linux                            # setpriv, losetup
  swtpm swtpm-tools                     # <tpm><backend type='emulator'>: swtpm, swtpm_setup
  openssh-client openssh-server openssl # remote URIs: ssh transport, its test sshd, TLS test PKI
  python3-cryptography                  # the SPICE test client encrypts its ticket (RSA-OAEP)
  ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: scripts/setup.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The dedicated account QEMU runs as in the system instance (like Debian's libvirt-qemu),
# with the kvm group so it can open /dev/kvm.
getent group kvm >/dev/null || groupadd --system kvm
getent group vmconfine-qemu >/dev/null || groupadd --system vmconfine-qemu
if ! getent passwd vmconfine-qemu >/dev/null; then
  useradd --system --gid vmconfine-qemu --groups kvm --home-dir /var/lib/vmconfine \
    --no-create-home --shell /usr/sbin/nologin --comment "vmconfine QEMU" vmconfine-qemu
fi
usermod -a -G kvm vmconfine-qemu
if [ -c /dev/kvm ]; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

# The project's venv.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
pip_log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >"$pip_log" 2>&1; then
  cat "$pip_log" >&2
  rm -f "$pip_log"
  echo "error: installing vmconfine into .venv failed (see above)" >&2
  exit 1
fi
rm -f "$pip_log"
# An editable install leaves the sources uncompiled; with PYTHONDONTWRITEBYTECODE set, every
# command would compile them again (~70 ms per CLI start). Compile them once, as pip does for a
# regular install (a source changed later is recompiled by Python as usual).
.venv/bin/python -m compileall -q core plugins aa-helper >/dev/null
.venv/bin/vmconfine --version >/dev/null
echo "vmconfine is set up: .venv/bin/vmconfine"
