"""What the default device is, for the ops' dispatch, and the mesh context Mosaic kernels need."""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from sharding.tokens import axis_shards, spec_axes, token_spec

HEADS_AXIS = "tensor"  # the mesh axis that splits attention heads


def is_hopper() -> bool:
    """True when the default device is an NVIDIA Hopper GPU (compute capability 9.0)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") in ("9.0", "9.0a")


def is_tpu() -> bool:
    """True when the default backend is a TPU."""
    return jax.default_backend() == "tpu"


def automatic_axes() -> tuple[str, ...]:
    """The current mesh's axes that are not manual here (none without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def mosaic_axes(b: int, t: int, heads: int) -> tuple[Any, str | None] | None:
    """Where a Mosaic (Pallas TPU) kernel over ``[B, T, heads, ...]`` runs on the current mesh:
    (the batch axes splitting B, as ``sharding.tokens.token_spec`` says, or None; ``tensor`` if
    it splits the heads, or None). None when another axis not yet manual has more than one
    device: the compiler cannot partition a Mosaic call, so it must run on each device's shard."""
    mesh = jax.sharding.get_abstract_mesh()
    rows = token_spec(b, t)
    batch = None if rows is None else rows[0]
    tensor = axis_shards(HEADS_AXIS)
    head_axis = HEADS_AXIS if tensor > 1 and heads % tensor == 0 else None
    named = spec_axes(P(batch, head_axis))
    if any(mesh.shape[a] > 1 for a in automatic_axes() if a not in named):
        return None
    return batch, head_axis


def can_run_mosaic() -> bool:
    """Whether a Mosaic kernel over whole (not split) operands can run here: every axis of the
    current mesh not yet manual has size 1 (``run_manual`` with replicated specs)."""
    mesh = jax.sharding.get_abstract_mesh()
    return all(mesh.shape[a] == 1 for a in automatic_axes())


def run_manual(fn: Callable[..., Any], args: tuple, in_specs: Any = P(), out_specs: Any = P()) -> Any:
    """fn(*args) inside ``shard_map`` manual over every axis of the current mesh not yet manual
    (operands split as ``in_specs``, results as ``out_specs``; the axes they do not name must
    have size 1), as a Mosaic kernel needs; fn(*args) as it is without such axes."""
    axes = automatic_axes()
    if not axes:
        return fn(*args)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes),
                         check_vma=False)(*args)
