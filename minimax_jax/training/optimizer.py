"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms and embeddings."""

from __future__ import annotations

from typing import Any

import jax
import optax

from minimax_jax.training.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps`, then cosine down to
    `learning_rate * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 1)),
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params):
    """True for parameters that get weight decay: everything but norm scales and embeddings."""

    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        return not ("scale" in names or "embed_tokens" in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, weight_decay on `decay_mask`)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def state_shardings(optimizer: optax.GradientTransformation, params: Any,
                    replicated: jax.sharding.Sharding) -> Any:
    """Shardings of `optimizer.init(params)` for params (arrays or ShapeDtypeStructs) placed on a
    mesh: every part of the state shaped like the params (AdamW's moments) split as the params
    are, the rest (step counts) `replicated`."""
    treedef = jax.tree.structure(params)
    like_params = lambda x: jax.tree.structure(x) == treedef  # noqa: E731
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.tree.map(lambda x: param_shardings if like_params(x) else replicated,
                        jax.eval_shape(optimizer.init, params), is_leaf=like_params)


def init_sharded(optimizer: optax.GradientTransformation, params: Any,
                 replicated: jax.sharding.Sharding | None) -> Any:
    """`optimizer.init(params)`, compiled; with `replicated` (a mesh's replicated sharding) placed
    by `state_shardings` (left to the compiler, the moments would be whole on every device)."""
    if replicated is None:
        return jax.jit(optimizer.init)(params)
    return jax.jit(optimizer.init, out_shardings=state_shardings(optimizer, params, replicated))(params)
