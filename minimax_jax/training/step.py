"""The loss and the jitted train / eval steps (pure functions of params, optimizer state, batch)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minimax_jax.loss import chunked_cross_entropy

LOSS_BLOCK = 1024  # tokens per block of the chunked cross-entropy


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """params (the trained part of the model's nnx.State, float32 master weights: every
    param, or with LoRA the adapters), opt_state, step int32 `[]`, rng uint32 key data
    (advanced every step; seeds the end-of-run sample)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def split_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Packed rows `[B, T + 1]` -> inputs, targets, positions, segment_ids `[B, T]` and the
    bool mask `[B, T]` of the targets that count in the loss.

    A target counts when it continues the same document as its input token and, when the rows
    carry an integer "loss_mask" `[B, T + 1]` (conversations: 1 on the assistant's tokens), its
    own loss_mask is nonzero.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    if "loss_mask" in batch:
        mask = mask & (batch["loss_mask"][:, 1:] != 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": batch["positions"][:, :-1],
        "segment_ids": seg[:, :-1],
        "mask": mask,
    }


def loss_fn(params, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], aux_coef: float,
            num_targets: jax.Array, num_micro: int = 1, frozen: nnx.State | None = None):
    """This micro-batch's share of the step loss (the cross-entropy taken LOSS_BLOCK tokens at a
    time: full-length logits never exist): sum of target NLL / num_targets (the whole
    step's target count) + aux_coef * MoE load-balancing loss / num_micro. Summed over the
    micro-batches of a step it is exactly the full batch's mean loss.

    `frozen`: the rest of the model's state (the frozen base of a LoRA run), not differentiated.
    Returns (loss, metrics: "nll_sum", "aux_loss" float32 scalars, "expert_load" float32 `[E]`).
    """
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    b = split_batch(batch)
    h, _, stats = model.hidden_states(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
    lm_head = model.lm_head[...].astype(h.dtype)
    nll_sum = chunked_cross_entropy(h, lm_head, b["targets"], b["mask"].astype(jnp.float32),
                                    block_size=LOSS_BLOCK)
    loss = nll_sum / num_targets + aux_coef * stats["aux_loss"] / num_micro
    return loss, {"nll_sum": nll_sum, "aux_loss": stats["aux_loss"], "expert_load": stats["expert_load"]}


def count_targets(batch: dict[str, jax.Array]) -> jax.Array:
    """Number of targets that count in the loss, float32 (at least 1)."""
    return jnp.maximum(jnp.sum(split_batch(batch)["mask"].astype(jnp.float32)), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "grad_accum", "aux_coef"),
                   donate_argnums=(0,))
def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, grad_accum: int, aux_coef: float,
               frozen: nnx.State | None = None):
    """One optimizer step over `batch` (int32 `[B, T + 1]` arrays), accumulating gradients over
    `grad_accum` equal micro-batches. Gradients are taken for `state.params` only; `frozen`
    (the LoRA base, or None) is read, never updated. A non-finite loss or gradient leaves
    params and optimizer state unchanged (metrics["finite"] = False). Returns (new state, metrics)."""
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
    num_targets = count_targets(batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grads, mb):
        (loss, metrics), g = grad_fn(state.params, graphdef, mb, aux_coef, num_targets, grad_accum, frozen)
        return jax.tree.map(jnp.add, grads, g), (loss, metrics)

    grads, (losses, metrics) = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, state.params), micro)
    loss = jnp.sum(losses)
    metrics = {"ce": jnp.sum(metrics["nll_sum"]) / num_targets, "aux_loss": jnp.mean(metrics["aux_loss"]),
               "expert_load": jnp.mean(metrics["expert_load"], axis=0)}

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1, rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
    )
    return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(params, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, frozen: nnx.State | None = None):
    """Validation: (sum of target NLL, number of targets) over one batch, both float32."""
    _, metrics = loss_fn(params, graphdef, batch, 0.0, jnp.float32(1.0), frozen=frozen)
    return metrics["nll_sum"], jnp.sum(split_batch(batch)["mask"].astype(jnp.float32))
