"""CPU time of the processes a benchmark path involves, read from ``/proc`` (Linux): a worker's process group,
the broker server, and the calling process itself."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from urllib.parse import urlsplit

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone meanwhile
    return stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...


def _cpu(fields: list[str]) -> float:
    """utime + stime + cutime + cstime (fields 14-17 of proc(5)), in seconds."""
    return sum(int(value) for value in fields[11:15]) / TICK


def group_cpu(pgid: int) -> float:
    """Seconds of CPU used so far by every live process of process group ``pgid`` (with its reaped children)."""
    total = 0.0
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        fields = _stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid:
            total += _cpu(fields)
    return total


def broker_pids(broker_url: str) -> list[int]:
    """The local broker server's processes: ``redis-server`` on the URL's port, or RabbitMQ's ``beam.smp``."""
    port = str(urlsplit(broker_url).port or 6379) if broker_url.startswith("redis") else ""
    pids = []
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (port and comm == "redis-server" and f":{port}" in cmdline) or (not port and comm == "beam.smp"):
            pids.append(int(pid))
    return pids


def pids_cpu(pids: list[int]) -> float:
    return sum(_cpu(fields) for pid in pids if (fields := _stat_fields(str(pid))) is not None)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
