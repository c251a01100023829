"""The suite's own check for qemu-user (tests/support/emulation.py): it tells emulation from
real hardware by the kernel's answer, so a real Pi or x86_64 CI never skips what only qemu-user
cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.emulation import user_mode_emulation


@pytest.mark.parametrize(("kernel", "machine", "expected"), [
    ("aarch64\n", "aarch64", None),                        # a Pi, or the smoke's arm64 VM
    ("x86_64\n", "x86_64", None),                          # CI
    ("x86_64\n", "aarch64", "aarch64 on a x86_64 kernel"),  # make test-arm64 (qemu-user)
    ("", "aarch64", None),                                 # an empty answer proves nothing
])
def test_emulation_is_the_process_machine_differing_from_the_kernels(
        tmp_path: Path, kernel: str, machine: str, expected: str | None) -> None:
    (tmp_path / "arch").write_text(kernel)
    assert user_mode_emulation(tmp_path / "arch", machine) == expected


def test_a_kernel_that_does_not_say_counts_as_real_hardware(tmp_path: Path) -> None:
    assert user_mode_emulation(tmp_path / "missing", "aarch64") is None

