#!/usr/bin/env bash
# Set vmconfine up and run every test tier: lint, unit, host (root: real QEMU, cgroups,
# Landlock, chown) and lsm (a booted kernel enforcing AppArmor / SELinux).
# VMCONFINE_REQUIRE_ALL=1 (the default here, as in CI) turns every "host feature missing" skip
# into a failure, so nothing silently stops being tested.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VMCONFINE_REQUIRE_ALL="${VMCONFINE_REQUIRE_ALL:-1}"
.venv/bin/ruff check .
exec .venv/bin/pytest -p no:cacheprovider "$@" tests
