"""Packet capture on a lab node's underlay interface (tcpdump), to show what crosses
between nodes: the demo and the tests use it to prove node-to-node bytes are TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.lab.topology import Node, stop_processes

UNDERLAY_INTERFACE = "ul0"


class UnderlayCapture:
    """tcpdump -w on the node's underlay interface, from start to `stop()`."""

    def __init__(self, node: Node, path: Path, expression: str = "tcp") -> None:
        self.path = path
        # -Z root: keep the right to write the file; --immediate-mode: no block buffering,
        # or packets still in the kernel ring are lost when it is stopped.
        self.process = node.spawn(["tcpdump", "-Z", "root", "--immediate-mode", "-U", "-i",
                                   UNDERLAY_INTERFACE, "-w", str(path), expression],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # "listening on ul0 ..." once it captures
        if "listening" not in line:
            self.process.kill()
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")

    def stop(self) -> bytes:
        """Stop capturing (by PID); the raw pcap bytes."""
        stop_processes([self.process])
        return self.path.read_bytes()

    def count(self, expression: str) -> int:
        """Packets in the capture that match a pcap filter expression."""
        result = subprocess.run(["tcpdump", "-nn", "-r", str(self.path), expression],
                                capture_output=True, text=True, check=True)
        return len(result.stdout.splitlines())
