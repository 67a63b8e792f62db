"""The default cap on the pinned host memory of the offload pool: what this process may use."""

from __future__ import annotations

import os

__all__ = ["default_host_cap_bytes"]

# Launchers' names for "processes on this host" (torchrun/accelerate, Slurm, Open MPI, MPICH/Intel MPI).
# SLURM_TASKS_PER_NODE is always set and may read "4(x2)" or "4,4" (this node's count comes first).
_LOCAL_PROCESS_VARS = (
    "LOCAL_WORLD_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
)
# cgroup v2 and v1 memory limits at the root of this process's cgroup view: a container sees the
# host's RAM in sysconf, not its own limit. Without a cgroup namespace (Slurm, systemd slices) the
# process's own cgroup and its parents are read too (see _own_cgroup_limits).
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _own_cgroup_limits() -> list[str]:
    """``memory.max`` of this process's cgroup v2 and each parent (the ``0::<path>`` line)."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if line.startswith("0::"):
            parts = [p for p in line[3:].split("/") if p]
            for i in range(len(parts), 0, -1):
                out.append("/sys/fs/cgroup/" + "/".join(parts[:i]) + "/memory.max")
    return out


def _host_memory_bytes() -> int | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in (*_CGROUP_LIMITS, *_own_cgroup_limits()):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge sentinel (v1) mean no limit
            limit = int(text)
            total = limit if total is None else min(total, limit)
    return total


def _local_processes() -> int:
    for var in _LOCAL_PROCESS_VARS:
        value = os.environ.get(var, "")
        head = value.split("(")[0].split(",")[0]  # Slurm may write "4(x2)" or "4,4"
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1


def default_host_cap_bytes() -> int | None:
    """Half of the host memory this process may use (the smaller of physical RAM and a cgroup
    limit), divided among this host's processes (torchrun, Slurm or MPI launcher variables);
    ``None`` when unknown."""
    total = _host_memory_bytes()
    return None if total is None else total // 2 // _local_processes()
