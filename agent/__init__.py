"""Pinion: a sidecarless service mesh for small k3s clusters."""

__version__ = "0.1.0"


def _watch_arenas() -> None:
    """From the first import of the agent on, pymalloc's arenas are recorded as they are mapped,
    so that `agent.memory.give_back_memory` can give back the free pools inside them after a
    burst (csrc/arenas.c); a recorder installed later would miss the arenas the imports map."""
    try:
        import agent._arenas as _arenas
    except ImportError:  # built without it: the free pools stay resident, as before
        return
    _arenas.watch()


_watch_arenas()
