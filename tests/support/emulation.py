"""Whether this test process runs under user-mode emulation (qemu-user through binfmt_misc, as
`make test-arm64` runs the suite on an x86_64 machine), so the few tests that measure the
emulator rather than the code can say so.

The answer comes from the kernel, not from a flag someone sets: qemu-user answers uname(2)
with the guest's machine (aarch64) but passes /proc/sys/kernel/arch through from the host
kernel (x86_64). On a real Pi, in the arm64 VM of `make smoke-arm64` and on x86_64 CI the two
agree, and every test runs. A kernel without /proc/sys/kernel/arch counts as not emulated: a
test then fails loudly rather than skips quietly on real hardware.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

KERNEL_ARCH = Path("/proc/sys/kernel/arch")


def user_mode_emulation(kernel_arch: Path = KERNEL_ARCH, machine: str | None = None) -> str | None:
    """"aarch64 on a x86_64 kernel" when the process's machine is not the kernel's, else None."""
    try:
        kernel = kernel_arch.read_text().strip()
    except OSError:
        return None
    process = machine if machine is not None else platform.machine()
    return None if not kernel or kernel == process else f"{process} on a {kernel} kernel"


EMULATION = user_mode_emulation()


def not_under_user_mode_emulation(why: str) -> pytest.MarkDecorator:
    """Skip a test only under qemu-user, saying why the emulator (not the platform) can't run it."""
    return pytest.mark.skipif(EMULATION is not None, reason=f"qemu-user ({EMULATION}): {why}")
