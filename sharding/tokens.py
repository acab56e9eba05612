"""Token arrays `[B, T, ...]` under the current mesh: how they are split, token-local computations
(each token's result depends on that token alone, like the MoE layer's routing and experts) run
on each device's own tokens, and the causal load-balanced ("zigzag") token order.

Zigzag order over P sequence shards: T is cut into 2P chunks of T / (2P) tokens and shard i holds
chunks i and 2P - 1 - i, so under a causal mask every shard has as many keys before its queries
as any other (in the contiguous order shard P - 1 has P times the work of shard 0).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


def sequence_chunks(t: int, zigzag: bool) -> tuple[int, int]:
    """(shards of the mesh's sequence axis, chunks per shard: 2 in zigzag order, else 1) for a
    sequence of `t` tokens; a ValueError when t is not a multiple of their product."""
    shards, per_shard = sequence_shards(), 2 if zigzag else 1
    if t % (shards * per_shard):
        raise ValueError(f"sequence length {t} is not a multiple of {shards * per_shard} (the mesh's "
                         f"sequence axis of {shards}{', in zigzag order' if zigzag else ''})")
    return shards, per_shard


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


def zigzag_shards(t: int) -> int:
    """P when the current mesh splits T tokens over P > 1 sequence shards and T is a multiple of
    2P (the zigzag order applies), else 0."""
    shards = sequence_shards()
    return shards if shards > 1 and t % (2 * shards) == 0 else 0


def zigzag_order(t: int, shards: int) -> np.ndarray:
    """int32 `[T]`: position p of a row in zigzag order over `shards` holds token order[p]."""
    c = t // (2 * shards)
    chunks = [j for i in range(shards) for j in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks]).astype(np.int32)


def zigzag_chunk(index: jax.Array | int, half: int, shards: int) -> jax.Array | int:
    """The chunk (of 2P) that half 0 / 1 of shard `index`'s tokens holds in zigzag order."""
    return index if half == 0 else 2 * shards - 1 - index


def reorder_tokens(x: jax.Array, *, to_zigzag: bool) -> jax.Array:
    """x `[B, T, ...]` split over the current mesh as `token_spec` says, from the contiguous
    order into zigzag order (to_zigzag) or back; T a multiple of 2P (`zigzag_shards`).

    Each shard sends its two half-shards by two `ppermute`s (of the two chunks a shard holds in
    one order, one is even and one odd; chunk c's contiguous home is shard c // 2), so the
    exchange moves each token once and no device holds more than its own tokens.
    """
    b, t = x.shape[:2]
    shards = zigzag_shards(t)
    if not shards:
        raise ValueError(f"{t} tokens cannot take the zigzag order of the current mesh "
                         f"(a sequence axis of P > 1 shards, T a multiple of 2P)")
    spec = token_spec(b, t)
    # zigzag shard s holds chunks s and 2P - 1 - s; contiguous shard r holds chunks 2r, 2r + 1
    zig = {c: (c, 0) if c < shards else (2 * shards - 1 - c, 1) for c in range(2 * shards)}
    rounds = []  # round p moves the chunks of parity p: (source shard, destination shard)
    for parity in (0, 1):
        chunks = range(parity, 2 * shards, 2)
        rounds.append([(c // 2, zig[c][0]) if to_zigzag else (zig[c][0], c // 2) for c in chunks])

    def local(x):
        even = (jax.lax.axis_index(SEQUENCE) % 2) == 0  # zigzag half 0 holds an even chunk
        half = x.shape[1] // 2
        parts = x[:, :half], x[:, half:]
        if to_zigzag:  # contiguous slot p is the chunk of parity p
            got = [jax.lax.ppermute(parts[p], SEQUENCE, perm) for p, perm in enumerate(rounds)]
            out = (jnp.where(even, got[0], got[1]), jnp.where(even, got[1], got[0]))
        else:  # each zigzag shard sends its chunk of parity p home, to slot p there
            own = ((jnp.where(even, parts[0], parts[1]), jnp.where(even, parts[1], parts[0])))
            out = tuple(jax.lax.ppermute(own[p], SEQUENCE, perm) for p, perm in enumerate(rounds))
        return jnp.concatenate(out, axis=1)

    run = jax.shard_map(local, in_specs=(spec,), out_specs=spec, axis_names=spec_axes(spec),
                        check_vma=False)
    return run(x)
