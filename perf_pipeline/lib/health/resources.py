"""The machine's resources without blocking: CPU as an average between two cumulative samples
(``psutil.cpu_times`` deltas, no sleep), memory, disk and the database's connections."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import psycopg


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds of the whole machine (all cores) at one instant."""

    busy_s: float
    total_s: float
    boot_time: float


def cpu_sample() -> CpuSample:
    """Non-blocking CPU sample (reads /proc/stat; microseconds)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return CpuSample(busy_s=total - idle, total_s=total, boot_time=psutil.boot_time())


def cpu_percent_between(before: CpuSample, after: CpuSample) -> float | None:
    """Average CPU utilisation (0–100, all cores) between two samples; None if they do not compare
    (a reboot in between, or no time elapsed)."""
    if before.boot_time != after.boot_time or after.total_s <= before.total_s:
        return None
    return max(0.0, min(100.0, 100 * (after.busy_s - before.busy_s) / (after.total_s - before.total_s)))


@dataclass
class ResourceSnapshot:
    cpu_percent: float | None
    cpu_window_s: float
    cpu: CpuSample
    memory_percent: float
    memory_available_bytes: int
    disk_percent: float
    disk_free_bytes: int
    load_1m_per_core: float
    connections: int
    active_connections: int
    max_connections: int
    since_previous: bool = False  # the CPU averages since ``previous`` (else over this call)

    @property
    def connection_ratio(self) -> float:
        return self.connections / self.max_connections if self.max_connections else 0.0


def system_resources(
    conn: psycopg.Connection,
    *,
    previous: CpuSample | None = None,
    disk_path: str = "/",
    min_window_s: float = 0.0,
) -> ResourceSnapshot:
    """CPU, memory, disk and database connections, without blocking.

    CPU is the average utilisation since ``previous`` (e.g. the sample stored with the last
    materialization: "CPU < 60 %" is about an average, not an instant); without a usable previous sample
    (a first run, a reboot since) it is measured over this call. Either way the window lasts at least
    ``min_window_s`` seconds: the call sleeps the rest (a previous sample taken a moment ago, or none, would
    give an instant's reading, which is noise; the load average is a different quantity). Cost: /proc reads, a statvfs, one pg_stat_activity read, and that sleep.
    """
    first = cpu_sample()
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE backend_type = 'client backend'),
               count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'active'),
               current_setting('max_connections')::int
        FROM pg_stat_activity
        """
    ).fetchone()
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(disk_path)
    now = cpu_sample()
    usable = previous is not None and cpu_percent_between(previous, now) is not None
    base = previous if usable and previous is not None else first
    cores = psutil.cpu_count() or 1
    left = min_window_s - (now.total_s - base.total_s) / cores
    if left > 0:
        time.sleep(left)
        now = cpu_sample()
    cpu = cpu_percent_between(base, now)
    return ResourceSnapshot(
        cpu_percent=cpu,
        cpu_window_s=(now.total_s - base.total_s) / cores,
        cpu=now,
        memory_percent=mem.percent,
        memory_available_bytes=mem.available,
        disk_percent=disk.percent,
        disk_free_bytes=disk.free,
        load_1m_per_core=psutil.getloadavg()[0] / cores,
        connections=row[0],
        active_connections=row[1],
        max_connections=row[2],
        since_previous=usable,
    )
