#!/bin/bash
# Prepare everything the lsm test tier boots: a Debian 12 kernel, a busybox initramfs and a
# private SELinux policy. Idempotent: each step is redone only when its inputs changed.
#
# usage: scripts/lsm-prepare.sh            (as root; no tty or stdin needed)
#
# Environment:
#   VMCONFINE_LSM_CACHE       cache dir (default /var/cache/vmconfine-lsm)
#   VMCONFINE_LSM_KERNEL_PKG  exact kernel package (default: what meta package
#                             linux-image-amd64 depends on, i.e. the newest Debian 12 kernel ABI)
#
# Output (in the cache dir):
#   kernel/KVER/{vmlinuz,config,modules/}   the kernel and the few modules the initramfs needs
#   initramfs-KVER.cpio                     busybox-static + tests/lsm/guest/init + modules
#   selinux/root/                           private policy root (etc/selinux/default/...)
#   manifest                                KEY=VALUE lines read by tests/lsm/harness.py
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`; nothing
# is installed into /boot. The SELinux policy is built with `semodule -p` into a private root
# from the selinux-policy-default package's module files; the host's /etc/selinux and
# /var/lib/selinux are only read.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive LC_ALL=C
exec </dev/null

repo=$(cd "$(dirname "$0")/.." && pwd)
guest_dir=$repo/tests/lsm/guest
cache=${VMCONFINE_LSM_CACHE:-/var/cache/vmconfine-lsm}
meta_pkg=linux-image-amd64
# Modules (and their dependencies) needed to mount the host root: 9p over virtio-pci, overlay.
root_modules=(9p 9pnet_virtio virtio_pci overlay)
# The USB host controller the harness's emulated USB device hangs on (qemu-xhci): usbcore makes
# /dev/bus/usb/BBB/DDD for it, which the USB hostdev hotplug test passes to a nested QEMU.
usb_modules=(xhci_pci)
# selinux-policy-default's postinst leaves these modules disabled; do the same.
se_notdefault=(amtu bugzilla cobbler condor cyphesis git ksmtuned likewise livecd nessus numad
  oddjob openca soundserver thunderbird updfstab usernetctl)

log() { echo "lsm-prepare: $*"; }
die() { echo "lsm-prepare: error: $*" >&2; exit 1; }
sha() { cat "$@" | sha256sum | cut -d' ' -f1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get download, depmod, semodule need it); rerun with sudo"
for tool in apt-get apt-cache dpkg-deb depmod modprobe cpio flock; do
  command -v "$tool" >/dev/null || die "$tool not found; install: apt-get install -y --no-install-recommends kmod cpio"
done
[ -x /bin/busybox ] || die "/bin/busybox not found; install: apt-get install -y busybox-static"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# --- 1. kernel ------------------------------------------------------------------------------
kpkg=${VMCONFINE_LSM_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
  # The meta package depends on exactly one versioned image package: the newest kernel ABI.
  kpkg=$(apt-cache depends "$meta_pkg" 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2}' | sort -V | tail -n1 || true)
fi
if [ -z "$kpkg" ]; then
  cached=$(sed -n 's/^KVER=//p' "$cache/manifest" 2>/dev/null || true)
  [ -n "$cached" ] && [ -f "$cache/kernel/$cached/vmlinuz" ] \
    || die "apt-cache knows no $meta_pkg; run apt-get update (or set VMCONFINE_LSM_KERNEL_PKG)"
  log "apt-cache knows no $meta_pkg; keeping cached kernel $cached"
  kpkg=linux-image-$cached
fi
kver=${kpkg#linux-image-}
kdir=$cache/kernel/$kver
# .done holds the module list the kernel dir was made with: a changed list redoes the step
kmods="${root_modules[*]} ${usb_modules[*]}"
if [ "$(cat "$kdir/.done" 2>/dev/null)" != "$kmods" ]; then
  log "fetching $kpkg"
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$kpkg") \
    || die "apt-get download $kpkg failed (no network or apt-get update needed)"
  dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/root"
  [ -f "$tmp/root/boot/vmlinuz-$kver" ] || die "$kpkg has no /boot/vmlinuz-$kver"
  kconfig=$tmp/root/boot/config-$kver
  # SELINUX_DEVELOP: the guest boots permissive (enforcing=0) and switches with setenforce.
  for opt in SECURITY_APPARMOR SECURITY_SELINUX SECURITY_SELINUX_DEVELOP; do
    grep -q "^CONFIG_$opt=y" "$kconfig" || die "$kpkg lacks CONFIG_$opt=y; pick another kernel"
  done
  grep -Eq '^CONFIG_NET_9P=[ym]' "$kconfig" \
    || die "$kpkg has no 9p support (cloud kernels lack it); use the generic amd64 flavour"
  grep -Eq '^CONFIG_USB_XHCI_PCI=[ym]' "$kconfig" \
    || die "$kpkg has no xHCI USB host controller driver; pick a kernel with CONFIG_USB_XHCI_PCI"
  depmod -b "$tmp/root" "$kver"
  rm -rf "$kdir.new"
  mkdir -p "$kdir.new/modules"
  cp "$tmp/root/boot/vmlinuz-$kver" "$kdir.new/vmlinuz"
  cp "$kconfig" "$kdir.new/config"
  # modprobe prints the insmod lines in load order; built-in modules print "builtin NAME".
  for m in "${root_modules[@]}" "${usb_modules[@]}"; do
    modprobe -d "$tmp/root" -S "$kver" --show-depends "$m"
  done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' > "$tmp/modlist"
  [ -s "$tmp/modlist" ] || die "no module files found for: $kmods"
  while read -r ko; do
    cp "$ko" "$kdir.new/modules/"
    basename "$ko" >> "$kdir.new/modules/order"
  done < "$tmp/modlist"
  echo "$kmods" > "$kdir.new/.done"
  rm -rf "$kdir"
  mv "$kdir.new" "$kdir"
  rm -rf "$tmp"
  trap - EXIT
  log "kernel $kver ready in $kdir"
else
  log "kernel $kver already cached"
fi

# --- 2. initramfs ---------------------------------------------------------------------------
initrd=$cache/initramfs-$kver.cpio
istamp=$(sha "$guest_dir/init" "$guest_dir/mkinitramfs.sh" /bin/busybox "$kdir/modules/order")
if [ ! -f "$initrd" ] || [ "$(cat "$initrd.stamp" 2>/dev/null)" != "$istamp" ]; then
  "$guest_dir/mkinitramfs.sh" "$kdir/modules" "$initrd"
  echo "$istamp" > "$initrd.stamp"
  log "initramfs written: $initrd"
else
  log "initramfs up to date"
fi

# --- 3. private SELinux policy --------------------------------------------------------------
se_share=/usr/share/selinux/default
se_root=$cache/selinux/root
se_policy=
if [ -f "$se_share/.modules" ] && command -v semodule >/dev/null; then
  base_stamp=$(dpkg-query -W -f='${Version}' selinux-policy-default 2>/dev/null || echo unknown)
  base_stamp="$base_stamp $(sha "$se_share/.modules" "$0")"
  if [ "$(cat "$se_root/.base-stamp" 2>/dev/null)" != "$base_stamp" ]; then
    log "building the private SELinux policy store (takes ~15 s)"
    new=$cache/selinux/root.new
    rm -rf "$new"
    mkdir -p "$new/etc/selinux/default" "$new/var/lib/selinux"
    # Package-owned, read-only inputs: the contexts files and setrans.conf.
    cp -a /etc/selinux/default/contexts /etc/selinux/default/setrans.conf "$new/etc/selinux/default/"
    # libsemanage reads ROOT/etc/selinux/semanage.conf when it exists; keep it self-contained.
    printf 'module-store = direct\nexpand-check = 0\n' > "$new/etc/selinux/semanage.conf"
    printf 'SELINUX=permissive\nSELINUXTYPE=default\n' > "$new/etc/selinux/config"
    args=(-p "$new" -s default -n -X 100)
    while read -r mod; do
      [ -n "$mod" ] && args+=(-i "$se_share/$mod.pp.bz2")
    done < "$se_share/.modules"
    for mod in "${se_notdefault[@]}"; do
      grep -qx "$mod" "$se_share/.modules" && args+=(-d "$mod")
    done
    # "user sddm not in password file" and similar user notes are harmless.
    semodule "${args[@]}" 2>&1 | grep -v 'not in password file' || true
    ls "$new"/etc/selinux/default/policy/policy.* >/dev/null 2>&1 \
      || die "semodule did not produce a policy in $new"
    echo "$base_stamp" > "$new/.base-stamp"
    rm -rf "$se_root"
    mv "$new" "$se_root"
  else
    log "private SELinux policy store up to date"
  fi
  # vmconfine's shipped modules (plugins/selinux/policy/*.cil, what an administrator installs
  # with semodule -i: docs/selinux.md), then the harness-only lsmtest.cil
  shipped=("$repo"/plugins/selinux/policy/*.cil)
  cil_stamp=$(sha "$guest_dir/lsmtest.cil" "${shipped[@]}")
  if [ "$(cat "$se_root/.cil-stamp" 2>/dev/null)" != "$cil_stamp" ]; then
    log "installing vmconfine's modules and the harness-only lsmtest.cil into the private policy"
    rm -f "$se_root/.cil-stamp"
    args=()
    for cil in "${shipped[@]}" "$guest_dir/lsmtest.cil"; do args+=(-i "$cil"); done
    semodule -p "$se_root" -s default -n -X 400 "${args[@]}" 2>&1 \
      | grep -v 'not in password file' || true
    for cil in "${shipped[@]}" "$guest_dir/lsmtest.cil"; do
      mod=$(basename "$cil" .cil)
      semodule -p "$se_root" -s default -l 2>/dev/null | grep -qx "$mod" \
        || die "semodule did not install $mod into $se_root"
    done
    echo "$cil_stamp" > "$se_root/.cil-stamp"
  fi
  se_policy=$(ls "$se_root"/etc/selinux/default/policy/policy.* | sort -V | tail -n1)
else
  log "selinux-policy-default or semodule missing: SELinux guests unavailable" \
    "(apt-get install -y --no-install-recommends selinux-policy-default policycoreutils)"
fi

# --- 4. manifest ----------------------------------------------------------------------------
{
  echo "KVER=$kver"
  echo "KPKG=$kpkg"
  echo "KERNEL=$kdir/vmlinuz"
  echo "INITRD=$initrd"
  echo "SELINUX_ROOT=${se_policy:+$se_root}"
  echo "SELINUX_POLICY=$se_policy"
} > "$cache/manifest.tmp"
mv -f "$cache/manifest.tmp" "$cache/manifest"
log "ready: $cache/manifest"
