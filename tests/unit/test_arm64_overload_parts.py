"""The pieces `make overload-arm64` adds around bench/overload.py: the result files come out of
the VM's console whole and nothing else does, the offered rate is split exactly over the load
clients, and a phase's peak comes from its own samples where the kernel cannot reset
memory.peak (cgroup v2 before Linux 6.12, as the VM's 6.1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import overload  # noqa: E402

CONSOLE = """\
[   26.1] virtio_blk virtio1: [vda] 6692864 512-byte logical blocks
pinion-smoke: running: python bench/overload.py --json $PINION_RESULT_DIR/overload.json
| nftables | 19.0 | 38.0 |
pinion-smoke: file overload.json follows
[{"mode": "nftables",
  "served": 2280}]
pinion-smoke: end of file overload.json
pinion-smoke: file ../escape follows
not taken
pinion-smoke: end of file ../escape
pinion-smoke: file overload.md follows
| mode | serves req/s |

pinion-smoke: end of file overload.md
pinion-smoke: exit 0
"""


def test_the_result_files_come_out_of_the_console_whole_and_nothing_else(tmp_path: Path) -> None:
    console = tmp_path / "console.txt"
    console.write_text(CONSOLE)
    out = tmp_path / "results"
    out.mkdir()
    subprocess.run(["awk", "-v", f"dir={out}", "-f", str(REPO / "tools/arm64/console-files.awk"),
                    str(console)], check=True, timeout=10)
    assert sorted(path.name for path in out.iterdir()) == ["overload.json", "overload.md"]
    assert (out / "overload.json").read_text() == '[{"mode": "nftables",\n  "served": 2280}]\n'
    assert (out / "overload.md").read_text() == "| mode | serves req/s |\n\n"
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(("total", "parts", "expected"), [
    (38.4, 10, [4, 4, 4, 4, 4, 4, 4, 4, 3, 3]),  # the VM's scale: int(38.4 / 10) = 3 each lost 8
    (26.0, 4, [7, 7, 6, 6]),                    # fewer pods than clients: only 4 pairs run
    (2009.0, 10, [201] * 9 + [200]),            # the x86 run's scale: as before, within 1
    (0.2, 3, [1, 0, 0]),                        # at least one connection a second
])
def test_the_offered_rate_is_split_exactly_over_the_clients(total: float, parts: int,
                                                          expected: list[int]) -> None:
    assert overload.split_rate(total, parts) == expected
    assert sum(expected) == max(1, round(total))


class NoReset:
    """A cgroup whose memory.peak is the peak since it was made (never read when not reset)."""

    def peak(self) -> int:
        raise AssertionError("memory.peak read for a phase it does not cover")


def test_a_phase_peak_without_reset_is_the_phases_own_highest_sample() -> None:
    run = overload.Run("ebpf", samples=[(0.5, 30.0, 25.0, 1.0), (10.0, 34.5, 29.0, 1.0),
                                        (90.0, 31.0, 26.0, 1.0), (95.0, 32.5, 27.0, 1.0)])
    assert overload.phase_peak(NoReset(), run, reset=False, since=90.0) == 32.5  # type: ignore[arg-type]
    assert overload.phase_peak(NoReset(), run, reset=False, since=0.0) == 34.5  # type: ignore[arg-type]
    assert run.peak_from.startswith("the highest 0.5 s sample")
