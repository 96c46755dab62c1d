"""How many cores this process may use: its CPU set, capped by its cgroup's CPU limit.

A container limited to 8 CPUs on a 64-core node sees all 64 in ``os.cpu_count()`` and in its CPU set; only
its cgroup's ``cpu.max`` (cgroup v2, where Kubernetes writes a container's CPU limit) tells the 8. Sizing
thread pools by the 64 starts threads the process can never run at once.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cores"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_MEMBERSHIP = Path("/proc/self/cgroup")


def usable_cores() -> int:
    """The cores this process may run on: its CPU set where the OS says (else the machine's), capped by its
    cgroup v2 CPU limit; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(_CGROUP_ROOT, _MEMBERSHIP)
    return max(1, cores if limit is None else min(cores, limit))


def cgroup_cpu_limit(root: Path, membership: Path) -> int | None:
    """The tightest CPU limit from the process's own cgroup up to ``root``, in whole cores.

    Args:
        root: the cgroup v2 mount (``/sys/fs/cgroup``); in a container, its own cgroup.
        membership: ``/proc/self/cgroup``, whose ``0::PATH`` line names the process's cgroup under ``root``.

    Returns:
        The smallest ``cpu.max`` quota over its period, rounded up (a fraction of a core still runs a thread);
        None where no cgroup on the way sets one or none can be read (cgroup v1, or no limit at all).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    folder = root / own.lstrip("/")
    limits = [
        limit
        for directory in (folder, *folder.parents)
        if directory.is_relative_to(root) and (limit := _cpu_max(directory / "cpu.max")) is not None
    ]
    return min(limits, default=None)


def _cpu_max(path: Path) -> int | None:
    """One ``cpu.max`` file ("QUOTA PERIOD" in microseconds, QUOTA ``max`` for none) in whole cores, rounded up;
    None without a usable limit."""
    try:
        quota, period = path.read_text().split()[:2]
        cores = -(-int(quota) // int(period)) if int(quota) > 0 and int(period) > 0 else None
    except (OSError, ValueError):  # no such file, "max", or not two numbers
        return None
    return cores
