"""The data plane: proxies, the mesh tunnel's shell, sockets, redirect backends, netns.

Its relay and tunnel shell are compiled by mypyc with agent.core's tunnel framing and
counters (agent/core/compiled.py): importing agent.core puts the hook that chooses their
build in place before any module of this package is found."""

from agent.core import compiled

compiled.install()  # done already by agent.core's import; said here, where it must hold
