"""What the default device is, for the ops' dispatch."""

from __future__ import annotations

import jax


def is_hopper() -> bool:
    """True when the default device is an NVIDIA Hopper GPU (compute capability 9.0)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") in ("9.0", "9.0a")
