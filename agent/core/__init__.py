"""Sans-IO logic: no asyncio, socket, ssl or subprocess imports below this package."""

from agent.core import compiled

compiled.install()  # the tunnel framing's compiled build, when it matches its sources
