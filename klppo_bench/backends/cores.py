"""How many workers a machine gives a sweep by default (its own module, so that the backends
can use it without importing the package that picks them)."""

from __future__ import annotations

import os


def default_workers() -> int:
    """The cores this process may use (its CPU affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
