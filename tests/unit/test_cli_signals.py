"""The CLI entry point's signal handling."""

from __future__ import annotations


def test_sigterm_exits_the_pinion_process_at_once_but_not_a_test_run_that_imports_the_cli() -> None:
    """The CLI's early SIGTERM handler (a container's PID 1 ignores a signal without one) is
    the `pinion` process's; a pytest process that imports agent.cli keeps its own, so a
    SIGTERM stops the run instead of failing whichever test is running."""
    import signal
    import subprocess
    import sys

    import agent.cli

    assert signal.getsignal(signal.SIGTERM) is not agent.cli._exit_on_sigterm
    child = subprocess.run(
        [sys.executable, "-c", "import signal, agent.cli; "
         "print(signal.getsignal(signal.SIGTERM) is agent.cli._exit_on_sigterm)"],
        capture_output=True, text=True, timeout=60, check=True)
    assert child.stdout.strip() == "True"
