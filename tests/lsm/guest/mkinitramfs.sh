#!/bin/bash
# Build the lsm-tier initramfs: busybox-static, the guest init, and the kernel modules needed to
# mount the host root over 9p with RAM overlays.
#
# usage: mkinitramfs.sh MODDIR OUTPUT
#   MODDIR  directory holding the .ko files plus "order" (one file name a line, load order)
#   OUTPUT  cpio (newc) archive to write; written atomically
set -euo pipefail
moddir=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}

if ldd "$busybox" >/dev/null 2>&1; then
  echo "mkinitramfs: $busybox is dynamically linked; install busybox-static" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,proc,sys,dev,newroot,mods}
cp "$busybox" "$work/bin/busybox"
for applet in sh mount umount mkdir insmod chroot cat echo sleep base64 sync tr; do
  ln -s busybox "$work/bin/$applet"
done
while read -r ko; do
  [ -n "$ko" ] || continue
  cp "$moddir/$ko" "$work/mods/"
  echo "$ko" >> "$work/mods/order"
done < "$moddir/order"
install -m 0755 "$here/init" "$work/init"
(cd "$work" && find . -print0 | LC_ALL=C sort -z | cpio -o -0 -H newc --quiet) > "$out.tmp"
mv -f "$out.tmp" "$out"
