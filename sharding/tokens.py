"""Token-local computations (each token's result depends on that token alone, like the MoE
layer's routing and experts) run on each device's own tokens under the current mesh."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from sharding.rules import DEFAULT_RULES

BATCH_AXES = DEFAULT_RULES["activation_batch"]
SEQUENCE = "sequence"


def axis_shards(axis: str) -> int:
    """The size of the current mesh's `axis` (1 without a mesh, without that axis, or inside a
    computation already manual over it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names or axis in mesh.manual_axes:
        return 1
    return mesh.shape[axis]


def sequence_shards() -> int:
    """`axis_shards("sequence")`."""
    return axis_shards(SEQUENCE)


def token_spec(b: int, t: int) -> P | None:
    """The PartitionSpec `[B, T, ...]` token arrays get on the current mesh: batch over its
    batch axes (those that divide B together), time over `sequence` (if it divides T); None
    without a mesh or when nothing is split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch = tuple(a for a in BATCH_AXES if axis_shards(a) > 1)
    if b % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    shards = sequence_shards()
    seq = SEQUENCE if shards > 1 and t % shards == 0 else None
    if not batch and seq is None:
        return None
    return P(batch or None, seq)


def spec_axes(spec: P) -> set[str]:
    """The mesh axes a PartitionSpec names."""
    return {a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part)}


def map_token_shards(fn: Callable[..., jax.Array], tokens: Sequence[jax.Array],
                     shared: Sequence[jax.Array]) -> jax.Array:
    """fn(*tokens, *shared) -> `[B, T, ...]`, run on each device's tokens: `tokens` are
    `[B, T, ...]` arrays split as `token_spec` says, `shared` arrays go to every device whole
    (their gradients summed over the devices). Without a mesh, fn runs as it is."""
    b, t = tokens[0].shape[:2]
    spec = token_spec(b, t)
    if spec is None:
        return fn(*tokens, *shared)
    run = jax.shard_map(fn, in_specs=(spec,) * len(tokens) + (P(),) * len(shared), out_specs=spec,
                        axis_names=spec_axes(spec), check_vma=False)
    return run(*tokens, *shared)


def constrain_tokens(x: jax.Array) -> jax.Array:
    """x `[B, T, ...]` held as `token_spec` says on the current mesh (unchanged without one)."""
    spec = token_spec(*x.shape[:2])
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
