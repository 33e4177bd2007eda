"""The generated cgroup device BPF program, run in a small interpreter against a reference
model of the kernel's allow-list semantics (no kernel needed)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vmconfine_cgroups import bpf
from vmconfine_cgroups.rules import DeviceRule, effective

MASK64 = (1 << 64) - 1
TYPES = {"b": bpf.DEVCG_DEV_BLOCK, "c": bpf.DEVCG_DEV_CHAR}


def run(program: bytes, dtype: int, access: int, major: int, minor: int) -> int:
    """Execute the subset of eBPF the generator emits on a bpf_cgroup_dev_ctx."""
    ctx = struct.pack("<III", (access << 16) | dtype, major, minor)
    insns = [struct.unpack_from("<BBhi", program, i * 8) for i in range(len(program) // 8)]
    regs = [0] * 11
    pc = 0
    for _ in range(10_000):
        assert 0 <= pc < len(insns), f"jump out of the program to {pc}"
        code, r, off, imm = insns[pc]
        dst, src = r & 0xF, r >> 4
        pc += 1
        if code == 0x61:  # ldxw dst, [src + off]: only the ctx in r1 is ever read
            assert src == 1 and off in (0, 4, 8)
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0x57:
            regs[dst] &= imm & MASK64
        elif code == 0x77:
            regs[dst] >>= imm
        elif code == 0xB7:
            regs[dst] = imm & MASK64
        elif code == 0xBF:
            regs[dst] = regs[src]
        elif code == 0x55:
            if regs[dst] != imm & MASK64:
                pc += off
        elif code == 0x5D:
            if regs[dst] != regs[src]:
                pc += off
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program did not terminate")


def reference(rules: list[DeviceRule], dtype: str, access: str, major: int, minor: int) -> int:
    """v1's semantics: rules for the same device merge; a request must fit one rule."""
    for r in effective(rules):
        if r.type not in ("a", dtype):
            continue
        if r.major is not None and r.major != major:
            continue
        if r.minor is not None and r.minor != minor:
            continue
        if set(access) <= set(r.access):
            return 1
    return 0


def request(program: bytes, dtype: str, access: str, major: int, minor: int) -> int:
    return run(program, TYPES[dtype], bpf.access_mask(access), major, minor)


LIBVIRT_DEFAULT = [DeviceRule.parse(t) for t in (
    "c 1:3 rw", "c 1:7 rw", "c 1:5 rw", "c 1:8 rw", "c 1:9 rw", "c 5:2 rw", "c 10:232 rw",
    "c 136:* rw", "b 7:0 r")]


def test_default_list_allows_and_denies() -> None:
    prog = bpf.assemble(LIBVIRT_DEFAULT)
    assert request(prog, "c", "rw", 1, 3) == 1  # /dev/null
    assert request(prog, "c", "rw", 10, 232) == 1  # /dev/kvm
    assert request(prog, "c", "rw", 136, 7) == 1  # a pty
    assert request(prog, "c", "m", 1, 3) == 0  # no mknod
    assert request(prog, "c", "r", 1, 1) == 0  # /dev/mem
    assert request(prog, "b", "rw", 1, 3) == 0  # right numbers, wrong type
    assert request(prog, "b", "r", 7, 0) == 1  # readonly loop
    assert request(prog, "b", "rw", 7, 0) == 0
    assert request(prog, "b", "", 7, 0) == 1  # access(F_OK): no bits requested


def test_empty_rule_set_denies_everything() -> None:
    prog = bpf.assemble([])
    assert bpf.insn_count(prog) == 8
    assert request(prog, "c", "", 1, 3) == 0


def test_wildcards() -> None:
    prog = bpf.assemble([DeviceRule.parse("a *:* m"), DeviceRule.parse("b 8:* r")])
    assert request(prog, "c", "m", 99, 1) == 1
    assert request(prog, "b", "m", 1, 1) == 1
    assert request(prog, "b", "r", 8, 33) == 1
    assert request(prog, "b", "rw", 8, 33) == 0


rule_st = st.builds(
    DeviceRule,
    st.sampled_from(["a", "b", "c"]),
    st.one_of(st.none(), st.integers(0, 12)),
    st.one_of(st.none(), st.integers(0, 12)),
    st.sampled_from(["r", "w", "m", "rw", "rm", "wm", "rwm"]),
)


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(rule_st, max_size=6),
       dtype=st.sampled_from(["b", "c"]),
       access=st.sampled_from(["", "r", "w", "m", "rw", "rwm"]),
       major=st.integers(0, 12), minor=st.integers(0, 12))
def test_program_matches_reference_semantics(rules: list[DeviceRule], dtype: str, access: str,
                                             major: int, minor: int) -> None:
    prog = bpf.assemble(rules)
    assert request(prog, dtype, access, major, minor) == reference(rules, dtype, access, major,
                                                                   minor)
