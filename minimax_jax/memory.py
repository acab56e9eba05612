"""Refuse a run whose arrays cannot fit before anything is allocated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import jax

from minimax_jax.config import ConfigError

GIB = 1 << 30


def require_memory(needed: int, what: str, devices: Sequence[jax.Device] | None = None, *,
                   hint: str = "use a smaller model, a lower-precision dtype or more devices") -> None:
    """Raise a ConfigError naming `what`, `needed` bytes and the memory there is when `needed`
    exceeds it: the devices' `bytes_limit` less what they already hold, summed (default: the
    first device), or for a CPU the host's available memory (`MemAvailable` in /proc/meminfo).
    `hint` ends the message. Unknown memory is not checked."""
    devices = list(devices or jax.devices()[:1])
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        have, where = free * len(devices), f"{len(devices)} {devices[0].device_kind} device(s)"
    else:
        meminfo = Path("/proc/meminfo")
        found = re.search(r"MemAvailable:\s*(\d+) kB", meminfo.read_text()) if meminfo.is_file() else None
        if found is None:
            return
        have, where = int(found.group(1)) * 1024, "this host"
    if needed > have:
        raise ConfigError(f"{what} needs {needed / GIB:.1f} GiB but {have / GIB:.1f} GiB are available on {where}; "
                          f"{hint}")
