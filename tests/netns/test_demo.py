"""`pinion demo` runs end to end on the real kernel, shows every pod, and leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
DEMO_SECONDS = 120
MESHED_CLIENTS = ("client-0", "client-1")
MESHED_SERVERS = ("web-0", "web-1")
COLUMNS = ("NODE", "POD", "MESHED", "OUT_CONN", "IN_CONN", "BYTES_OUT", "BYTES_IN")


def _run_demo(redirect: str) -> subprocess.CompletedProcess[str]:
    """Run the demo; if it hangs, interrupt it (it tears down on Ctrl-C) before failing."""
    argv = [sys.executable, "-m", "agent", "demo", "--redirect", redirect, "--requests", "20"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=DEMO_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"the demo took over {DEMO_SECONDS} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _namespace_prefix(output: str) -> str:
    match = re.search(r"network namespaces (pn[a-z0-9]+-)\*", output)
    assert match, f"the demo did not say which namespaces it makes:\n{output}"
    return match.group(1)


def _table(output: str) -> dict[str, dict[str, str]]:
    """The per-pod table, as {pod: {column: cell}}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["NODE", "POD"])
    assert tuple(lines[start].split()) == COLUMNS
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())  # single spaces only inside "69.8 kB"
        if len(cells) != len(COLUMNS):
            break
        rows[cells[1]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


def _namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]


@pytest.mark.timeout(DEMO_SECONDS + 90)
@pytest.mark.parametrize("redirect", ["nftables", "iptables"])
def test_demo_counts_every_meshed_pod_and_removes_its_lab(redirect: str) -> None:
    demo = _run_demo(redirect)
    output = demo.stdout
    assert demo.returncode == 0, f"{output}\n{demo.stderr}"
    assert f"({redirect} capture)" in output

    table = _table(output)
    assert set(table) == {*MESHED_CLIENTS, *MESHED_SERVERS, "legacy"}
    for pod in MESHED_CLIENTS:
        assert table[pod]["MESHED"] == "yes"
        assert int(table[pod]["OUT_CONN"]) > 0
    for pod in MESHED_SERVERS:
        assert table[pod]["MESHED"] == "yes"
        assert int(table[pod]["IN_CONN"]) > 0
    assert table["legacy"]["MESHED"] == "no"
    assert [table["legacy"][column] for column in COLUMNS[3:]] == ["-"] * 4

    assert "counts match curl" in output
    assert "appears 0 times: TLS on the wire" in output  # meshed pods' bytes crossed as TLS
    assert "tls labels on the agents' series: no_identity, true" in output
    assert "cleaned up: no namespaces left" in output
    prefix = _namespace_prefix(output)
    assert [name for name in _namespaces() if name.startswith(prefix)] == []
