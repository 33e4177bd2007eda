#!/usr/bin/env bash
# Set vmconfine up and run every test tier: lint, unit, host (root: real QEMU, cgroups,
# Landlock, chown) and lsm (a booted kernel enforcing AppArmor / SELinux).
# VMCONFINE_REQUIRE_ALL=1 (the default here, as in CI) turns every "host feature missing" skip
# into a failure, so nothing silently stops being tested.
#
# The lsm tier runs beside the other two: its tests boot guest kernels under TCG and change no
# host state the unit and host tiers look at (they share only the package cache and the
# lsm-prepare cache, which only the lsm tier uses), so the whole run takes about as long as the
# longer of the two instead of their sum. Its output is printed when both are done.
# VMCONFINE_SERIAL_TIERS=1 runs everything in one pytest process instead.
# Arguments are passed to pytest (both runs when the tiers run side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VMCONFINE_REQUIRE_ALL="${VMCONFINE_REQUIRE_ALL:-1}"
.venv/bin/ruff check .
pytest=(.venv/bin/pytest -p no:cacheprovider)
if [ "${VMCONFINE_SERIAL_TIERS:-0}" = 1 ]; then
  exec "${pytest[@]}" "$@" tests
fi

lsm_log=$(mktemp --tmpdir vmconfine-lsm-tier.XXXXXX.log)
lsm_pid=
finish() {
  # Never leave the background tier running (or its guests) when this script is stopped.
  if [ -n "$lsm_pid" ] && kill -0 "$lsm_pid" 2>/dev/null; then
    kill -TERM -- "-$lsm_pid" 2>/dev/null || kill -TERM "$lsm_pid" 2>/dev/null || true
    wait "$lsm_pid" 2>/dev/null || true
  fi
  rm -f "$lsm_log"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "test.sh: the lsm tier runs in the background; its output follows the other tiers' (log: $lsm_log)"
# In its own process group, so that stopping this script stops the tier and its guests too.
setsid "${pytest[@]}" "$@" tests/lsm </dev/null >"$lsm_log" 2>&1 &
lsm_pid=$!

main_rc=0
"${pytest[@]}" "$@" --ignore=tests/lsm tests || main_rc=$?

lsm_rc=0
wait "$lsm_pid" || lsm_rc=$?
lsm_pid=
echo
echo "==================================== lsm tier ===================================="
cat "$lsm_log"
echo "test.sh: unit + host tiers exit $main_rc, lsm tier exit $lsm_rc"
# pytest's exit 5 means "no tests collected": a selection (-k, a path) may leave one side
# empty, which is not a failure of the run as long as the other side ran tests.
if [ "$main_rc" = 5 ] && [ "$lsm_rc" != 5 ]; then main_rc=0; fi
if [ "$lsm_rc" = 5 ] && [ "$main_rc" != 5 ]; then lsm_rc=0; fi
if [ "$main_rc" != 0 ]; then exit "$main_rc"; fi
exit "$lsm_rc"
