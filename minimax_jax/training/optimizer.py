"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms and embeddings."""

from __future__ import annotations

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
