#!/usr/bin/env bash
# The main job: set vmconfine up, then boot the example guest confined under
# qemu:///embed?root=$VMCONFINE_DEMO_DIR (default /var/tmp/vmconfine-demo). The guest prints a
# greeting on its serial port and powers off; vmconfine tears everything down and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
DEMO=${VMCONFINE_DEMO_DIR:-/var/tmp/vmconfine-demo}
rm -rf "$DEMO"
mkdir -p "$DEMO/etc" "$DEMO/images"
chmod 0755 "$DEMO" "$DEMO/images"
.venv/bin/python examples/mkbootimg.py "$DEMO/images/hello.img"
sed "s|@DIR@|$DEMO/images|g" examples/hello.xml > "$DEMO/hello.xml"
cp examples/qemu.conf "$DEMO/etc/qemu.conf"
URI="qemu:///embed?root=$DEMO"
echo "== before: $(stat -c '%n owner %u:%g mode %a' "$DEMO/images/hello.img")"
.venv/bin/vmconfine -c "$URI" run "$DEMO/hello.xml"
echo "== guest serial console:"
cat "$DEMO/images/serial.log"
echo "== after:  $(stat -c '%n owner %u:%g mode %a' "$DEMO/images/hello.img")"
