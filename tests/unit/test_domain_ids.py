"""Domain ids: the per-instance counter (vmconfine.launch.runtime.next_domain_id)."""

from __future__ import annotations

from pathlib import Path

from vmconfine.config.instance import open_instance
from vmconfine.launch import runtime


def test_ids_increase_and_an_unreadable_counter_starts_again(tmp_path: Path) -> None:
    inst = open_instance(f"qemu:///embed?root={tmp_path}")
    inst.ensure_dirs()
    counter = inst.run_dir / ".next_id"
    with runtime.instance_lock(inst):
        assert [runtime.next_domain_id(inst) for _ in range(3)] == [1, 2, 3]
    assert counter.read_text() == "4\n"
    counter.write_text("9\n")
    assert runtime.next_domain_id(inst) == 9
    assert counter.read_text() == "10\n"
    counter.write_text("garbage left by a crash\n")  # longer than any id: cut to the id
    assert runtime.next_domain_id(inst) == 1
    assert counter.read_text() == "2\n"
    assert counter.stat().st_mode & 0o777 == 0o600
