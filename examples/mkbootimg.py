#!/usr/bin/env python3
"""Build the demo guest: a 1 MiB raw disk whose boot sector prints a greeting on the first
serial port (COM1, I/O port 0x3f8) and powers the machine off through ACPI (PM1a control
register at 0x604 on QEMU's pc machine, SLP_EN with sleep type S5).

Nothing is downloaded: the 16-bit machine code is assembled here, by hand.

With --stay, the guest halts after the greeting instead of powering off (it keeps running
until it is destroyed).

usage: mkbootimg.py [--stay] OUTPUT [GREETING]
"""

from __future__ import annotations

import sys

ORIGIN = 0x7C00
SIZE = 1024 * 1024  # AHCI and virtio need at least 1 MiB to boot


def boot_sector(greeting: str, poweroff: bool = True) -> bytes:
    code = bytearray()

    def emit(*b: int) -> int:
        code.extend(b)
        return len(code)

    emit(0xFA)  # cli
    emit(0xFC)  # cld
    emit(0x31, 0xC0)  # xor ax, ax
    emit(0x8E, 0xD8)  # mov ds, ax
    mov_si = emit(0xBE, 0, 0) - 2  # mov si, imm16 (patched below)
    loop = len(code)
    emit(0xAC)  # lodsb
    emit(0x84, 0xC0)  # test al, al
    jz_at = emit(0x74, 0) - 1  # jz done (patched)
    emit(0xBA, 0xF8, 0x03)  # mov dx, 0x3f8
    emit(0xEE)  # out dx, al
    end = emit(0xEB, 0)  # jmp loop
    code[end - 1] = (loop - end) & 0xFF
    done = len(code)
    code[jz_at] = (done - (jz_at + 1)) & 0xFF
    if poweroff:
        emit(0xBA, 0x04, 0x06)  # mov dx, 0x604
        emit(0xB8, 0x00, 0x20)  # mov ax, 0x2000 (SLP_EN, SLP_TYP=0: S5)
        emit(0xEF)  # out dx, ax
    hang = len(code)
    emit(0xF4)  # hlt
    end = emit(0xEB, 0)  # jmp hang
    code[end - 1] = (hang - end) & 0xFF
    msg_addr = ORIGIN + len(code)
    code[mov_si : mov_si + 2] = msg_addr.to_bytes(2, "little")
    code.extend(greeting.encode("ascii") + b"\r\n\x00")
    if len(code) > 510:
        raise SystemExit("greeting too long for a boot sector")
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"


def main() -> int:
    args = sys.argv[1:]
    stay = "--stay" in args
    args = [a for a in args if a != "--stay"]
    if len(args) not in (1, 2):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 1
    greeting = args[1] if len(args) == 2 else "Hello from a confined vmconfine guest!"
    write_image(args[0], greeting, poweroff=not stay)
    return 0


def write_image(path: str, greeting: str, *, poweroff: bool = True) -> None:
    """Write the 1 MiB raw boot disk to ``path``."""
    sector = boot_sector(greeting, poweroff)
    with open(path, "wb") as f:
        f.write(sector + bytes(SIZE - len(sector)))


if __name__ == "__main__":
    sys.exit(main())
