"""Causal GQA self-attention on TPU through JAX's Pallas TPU splash attention kernels.

``splash_attention(q, k, v, q_segment_ids, kv_segment_ids)``: the op's mask (key j visible to
query i iff j <= i and, with segment ids, their ids are equal) as splash's static causal mask and
its segment ids; forward and backward (dq, dk/dv) kernels from JAX's
``jax.experimental.pallas.ops.tpu.splash_attention``. GQA runs splash's MQA form per KV head: the
G = H / N query heads of KV head n attend to its one K/V. Scores are scaled by 1/sqrt(K) by
scaling q before the kernel. Splash gives a query that sees no key the mean of the values of the
blocks it visits, not the op's 0: the dispatch (``pallas_kernels.softmax``) takes splash only when
every query sees itself (``q_segment_ids`` equal to ``kv_segment_ids``).

Under a mesh the kernels run inside ``shard_map`` (manual over every axis not yet manual) on each
device's rows (the batch axes that split B, as ``sharding.tokens.token_spec`` says) and KV heads
(over ``tensor`` where it divides N); a Mosaic call cannot be partitioned by the compiler itself,
so a mesh with another axis of more than one device takes the XLA form instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from pallas_kernels.device import mosaic_axes, run_manual

BLOCKS = (512, 256, 128)  # block lengths tried, longest first; splash needs multiples of 128
DTYPES = (jnp.bfloat16, jnp.float32)


def block_length(t: int) -> int | None:
    """The longest of ``BLOCKS`` dividing T (query and key blocks), or None."""
    return next((b for b in BLOCKS if t % b == 0), None)


def mesh_spec(b: int, t: int, n: int) -> P | None:
    """The spec ``[B, T, N, K]`` the kernels run under on the current mesh (``device.mosaic_axes``:
    B over the batch axes that split it, the N heads over ``tensor`` where it divides them), or
    None where a Mosaic kernel cannot run."""
    axes = mosaic_axes(b, t, n)
    return None if axes is None else P(axes[0], None, axes[1], None)


def supports(q: jax.Array, k: jax.Array, v: jax.Array, causal_offset: bool) -> bool:
    """Whether the splash kernels run this call: self-attention (T == S, no query offset), q, k, v
    of one dtype in ``DTYPES``, T a multiple of 128, H a multiple of N, a mesh the kernels can run
    under (``mesh_spec``)."""
    if causal_offset or not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return False
    b, t, h, _ = q.shape
    n = k.shape[2]
    return (t == k.shape[1] and block_length(t) is not None and h % n == 0
            and mesh_spec(b, t, n) is not None)


def _kernel(t: int, group: int, interpret: bool):
    """Splash's MQA kernel for G = group query heads over T tokens, causal. Made anew in each
    trace (its mask tables become that trace's constants; splash caches the mask processing
    itself), so no kernel holds another trace's arrays."""
    block = block_length(t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * group)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q, k, v, q_seg, kv_seg, *, interpret: bool):
    """`splash_attention` on the rows and heads at hand."""
    b, t, h, d = q.shape
    n = k.shape[2]
    g = h // n
    kernel = _kernel(t, g, interpret)
    qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, n, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, N, S, K]

    def one_row(qr, kr, vr, qs, ks):  # qr [N, G, T, K], kr / vr [N, S, K]
        seg = None if qs is None else splash.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=seg))(qr, kr, vr)

    if q_seg is None:
        o = jax.vmap(lambda qr, kr, vr: one_row(qr, kr, vr, None, None))(qh, kh, vh)
    else:
        o = jax.vmap(one_row)(qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None,
                     kv_segment_ids: jax.Array | None, *, interpret: bool = False) -> jax.Array:
    """Causal GQA self-attention through splash (``supports`` says which calls).

    q ``[B, T, H, K]``; k, v ``[B, T, N, K]``; segment ids int ``[B, T]`` each, or both None; every
    query must see itself (equal q and kv ids: see the module docstring). ``interpret`` runs the
    kernels in Pallas' interpreter (any backend). Returns ``[B, T, H, K]`` in q's dtype.
    """
    if not supports(q, k, v, False):
        raise ValueError(f"splash takes self-attention in bf16 / float32 with T a multiple of 128 "
                         f"and H a multiple of N: q {q.dtype} {q.shape}, k {k.dtype} {k.shape}")
    spec = mesh_spec(q.shape[0], q.shape[1], k.shape[2])
    seg = P(spec[0], None)
    segs = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    body = lambda q, k, v, *s: _local(q, k, v, *(s or (None, None)), interpret=interpret)  # noqa: E731
    return run_manual(body, (q, k, v, *segs), (spec,) * 3 + (seg,) * len(segs), spec)
