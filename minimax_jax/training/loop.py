"""The training loop behind `train.py`: build, restore, step, evaluate, checkpoint, report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minimax_jax import lora, quant
from minimax_jax.checkpoint import CheckpointError, load_model, param_shapes, save_model
from minimax_jax.config import MiniMaxConfig
from minimax_jax.generate import generate
from minimax_jax.lora_checkpoint import save_adapters
from minimax_jax.memory import require_memory
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.tokenizer import Tokenizer, load_tokenizer
from minimax_jax.training.checkpointing import TrainCheckpoints, abstract_like, ensure_writable
from minimax_jax.training.config import TrainConfig, check_seq_len
from minimax_jax.training.conversations import ConversationPipeline, sample_reply, training_template
from minimax_jax.training.data import DataPipeline, find_files, global_batch
from minimax_jax.training.metrics import MetricsLogger, peak_flops, plot_losses, train_flops_per_token
from minimax_jax.training.optimizer import init_sharded, learning_rate_schedule, make_optimizer
from minimax_jax.training.step import TrainState, eval_step, split_batch, train_step
from minimax_jax.training.stdlib_conversations import write_conversations
from sharding import batch_sharding, make_mesh, param_shardings
from sharding.distributed import is_primary

log = logging.getLogger("minimax_jax.training")

# Fields of the model config that describe how to compute, not the architecture: with
# `init_from`, the architecture comes from the checkpoint and these come from the run's config.
COMPUTE_FIELDS = ("dtype", "param_dtype", "lightning_impl", "softmax_impl", "moe_impl", "remat",
                  "router_aux_loss_coef")


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class _StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def unigram_entropy(batches: list[dict[str, np.ndarray]]) -> float:
    """Entropy (nats) of the validation targets' own unigram distribution: the loss of the best
    possible unigram model on exactly these tokens."""
    parts = [split_batch(b) for b in batches]
    targets = np.concatenate([np.asarray(p["targets"])[np.asarray(p["mask"])] for p in parts])
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def model_config(tcfg: TrainConfig, mcfg: MiniMaxConfig) -> MiniMaxConfig:
    """The config of the model to train: `mcfg`, or with `init_from` the architecture in that
    checkpoint's config.json with the compute fields of `mcfg`."""
    if tcfg.init_from is None:
        return mcfg
    if not Path(tcfg.init_from).is_dir():
        raise CheckpointError(f"init_from: checkpoint directory {tcfg.init_from} does not exist")
    arch = MiniMaxConfig.from_hf_config(tcfg.init_from)
    return arch.replace(**{k: getattr(mcfg, k) for k in COMPUTE_FIELDS})


def training_bytes(cfg: MiniMaxConfig, lcfg: lora.LoraConfig | None = None) -> int:
    """Device bytes of the training state of `cfg`: params and gradients in `param_dtype`, and
    AdamW's two float32 moments (activations not counted). With LoRA (`lcfg.enabled`): the
    frozen base (its projections in `lcfg.quantize`, values and float32 scales) and the float32
    adapters with their gradients and moments."""
    shapes = param_shapes(cfg)
    itemsize = np.dtype(cfg.param_dtype).itemsize
    if lcfg is None or not lcfg.enabled:
        return sum(math.prod(s) for s in shapes.values()) * (2 * itemsize + 2 * 4)
    base = 0
    for path, shape in shapes.items():
        stored = quant.stored_param(path, shape, lcfg.quantize)
        base += (math.prod(shape) * itemsize if stored is None else
                 math.prod(shape) * stored.value_dtype.itemsize + math.prod(stored.scale_shape) * 4)
    model = nnx.eval_shape(lambda: lora.add_adapters(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), lcfg,
                                                     rngs=nnx.Rngs(0)))
    return base + sum(math.prod(s) for s in lora.adapter_shapes(model).values()) * 4 * 4


def build_model(tcfg: TrainConfig, mcfg: MiniMaxConfig, *, mesh: jax.sharding.Mesh | None = None,
                verify: bool = True, allow_non_finite: bool = False) -> MiniMaxForCausalLM:
    """A fresh model, or the weights of `init_from` (architecture from that checkpoint, the
    compute fields of `mcfg`: every layer is built with them, then the weights are put in,
    checked against the checkpoint's checksums unless `verify=False` and refused with NaN / Inf
    unless `allow_non_finite`). With a mesh a fresh model is created already split over it (each
    device initialises its own shards; the whole model never sits on one device) and loaded
    weights are placed on it. With LoRA (`tcfg.lora`) the loaded model, its projections
    quantized as `lora.quantize` says, gets fresh adapters (split like the weights they adapt).
    Refuses a `seq_len` beyond the model's positions and a model whose
    training state cannot fit in the devices' memory, before allocating anything."""
    cfg, lcfg = model_config(tcfg, mcfg), tcfg.lora_settings
    check_seq_len(tcfg, cfg)
    devices = None if mesh is None else sorted(mesh.devices.flat, key=lambda d: d.process_index != jax.process_index())
    require_memory(training_bytes(cfg, lcfg), f"training the {cfg.num_hidden_layers}-layer, "
                   f"{cfg.hidden_size}-wide model (params, gradients, AdamW state)", devices)
    create = lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(tcfg.seed))  # noqa: E731
    model = nnx.eval_shape(create if lcfg.quantize is None else lambda: quant.quantize_model(create(), lcfg.quantize))
    shardings = None if mesh is None else param_shardings(nnx.state(model, nnx.Param), mesh)
    if tcfg.init_from is None:
        if shardings is None:
            return create()
        state = jax.jit(lambda: nnx.state(create(), nnx.Param), out_shardings=shardings)()
    else:
        loaded = load_model(tcfg.init_from, dtype=cfg.param_dtype, quantize=lcfg.quantize, verify=verify,
                            allow_non_finite=allow_non_finite, mesh=mesh)
        state = nnx.state(loaded, nnx.Param)
        log.info("initialised from %s (architecture from its config.json)", tcfg.init_from)
    nnx.update(model, state)
    if lcfg.enabled:
        lora.add_adapters(model, lcfg, rngs=nnx.Rngs(tcfg.seed))
        if mesh is not None:
            adapters = nnx.state(model, lora.LoraParam)
            nnx.update(model, jax.device_put(adapters, param_shardings(adapters, mesh)))
    return model


def split_trainable(model: MiniMaxForCausalLM, lcfg: lora.LoraConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, the params that train, the frozen rest): with LoRA the adapters train and the
    base is frozen; without, every param trains and nothing is frozen (None)."""
    if lcfg.enabled:
        return nnx.split(model, lora.LoraParam, ...)
    graphdef, params = nnx.split(model)
    return graphdef, params, None


def evaluate(params, graphdef, batches, frozen=None) -> float:
    """Mean validation cross-entropy (nats per target token) over `batches` (`frozen`: the
    frozen base of a LoRA run, or None)."""
    total = count = 0.0
    for b in batches:
        s, n = eval_step(params, b, graphdef=graphdef, frozen=frozen)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def sample_text(model: MiniMaxForCausalLM, tokenizer: Tokenizer, prompt: str, n: int, seed: int) -> str:
    """Continue `prompt` by `n` tokens (temperature 0.8, top_p 0.95) and return prompt + continuation."""
    ids = jnp.asarray([[tokenizer.bos_token_id, *tokenizer.encode(prompt)]], jnp.int32)
    out = generate(model, ids, n, temperature=0.8, top_p=0.95, seed=seed, eos_token_id=tokenizer.eos_token_id)
    new = [int(t) for t in np.asarray(out[0])]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return prompt + tokenizer.decode(new)


def run(tcfg: TrainConfig, mcfg: MiniMaxConfig, *, verify: bool = True,
        allow_non_finite: bool = False) -> dict[str, Any]:
    """Train per the configs; returns a summary (final losses, baseline, paths, throughput).

    In a multi-process job (`sharding.distributed.initialize` first) every process runs this
    with the same configs; each feeds its devices' rows of every batch, all write the Orbax
    checkpoints, process 0 alone writes the metrics and the plot; no model directory and no
    sample are made (summary `model_dir` None): resuming the checkpoint in one process does that.
    With LoRA (`tcfg.lora`) only the adapters train (the optimizer state and the checkpoints
    hold only them) and the run writes them alone to `run_dir`/adapter (summary `adapter_dir`)
    instead of a model directory.

    `verify=False` resumes from and initialises from checkpoints without checking their
    checksums; `allow_non_finite` accepts NaN / Inf weights in `init_from`.
    """
    run_dir = Path(tcfg.run_dir)
    ensure_writable(run_dir, "run directory")
    checkpoints = TrainCheckpoints(tcfg.checkpoints, keep=tcfg.keep_checkpoints, save_every=tcfg.save_every,
                                   verify=verify)
    tokenizer = load_tokenizer(tcfg.tokenizer)
    mesh_shape = tcfg.mesh or ({"data": -1} if jax.process_count() > 1 else None)
    mesh = make_mesh(mesh_shape) if mesh_shape else None
    model = build_model(tcfg, mcfg, mesh=mesh, verify=verify, allow_non_finite=allow_non_finite)
    mcfg = model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {mcfg.vocab_size}")
    packing = dict(seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, val_fraction=tcfg.val_fraction, seed=tcfg.seed)
    template = None
    if tcfg.data_format == "conversations":
        template = training_template(tcfg.init_from, tcfg.tokenizer, mcfg.model_type)
        files = find_files(tcfg.data) if tcfg.data else [write_conversations(run_dir / "stdlib_conversations.jsonl")]
        data = ConversationPipeline(files, tokenizer, template, truncate=tcfg.long_conversations == "truncate",
                                    **packing)
    else:
        data = DataPipeline(find_files(tcfg.data), tokenizer, **packing)
    log.info("data: %s", data.summary)

    lcfg = tcfg.lora_settings
    graphdef, params, frozen = split_trainable(model, lcfg)
    place_batch = lambda batch: batch  # noqa: E731 - single device: batches go as they are
    mesh_scope = contextlib.nullcontext  # the steps run under the mesh, so the ops see it
    replicated = None
    if mesh is not None:
        mesh_scope = functools.partial(jax.set_mesh, mesh)
        rows = batch_sharding(mesh)
        axes = (rows.spec[0],) if isinstance(rows.spec[0], str) else tuple(rows.spec[0] or ())
        ways = math.prod(mesh.shape[a] for a in axes)
        if tcfg.batch_size % (ways * tcfg.grad_accum):
            raise ValueError(f"batch_size ({tcfg.batch_size}) in {tcfg.grad_accum} micro-batch(es) cannot be split "
                             f"{ways} ways over mesh axes {list(axes)} (mesh {dict(mesh.shape)})")
        place_batch = functools.partial(global_batch, sharding=rows)
        replicated = NamedSharding(mesh, PartitionSpec())
        log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    optimizer = make_optimizer(tcfg)
    schedule = learning_rate_schedule(tcfg)
    rng = np.asarray(jax.random.key_data(jax.random.key(tcfg.seed)))
    state = TrainState(params=params, opt_state=init_sharded(optimizer, params, replicated),
                       step=jax.device_put(np.zeros((), np.int32), replicated), rng=jax.device_put(rng, replicated))
    skipped = 0
    restored = checkpoints.restore_latest(abstract_like(state)) if tcfg.resume else None
    if restored is not None:
        step0, state, extra = restored
        data.set_state(extra["data"])
        skipped = int(extra["skipped_steps"])
        log.info("resumed from step %d of %s", step0, checkpoints.directory)
    start = int(state.step)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log.info("model: %.2fM parameters; training steps %d..%d, %d tokens per step",
             n_params / 1e6, start, tcfg.steps, tcfg.batch_size * tcfg.seq_len)

    val_batches = data.validation(tcfg.eval_batches)
    baseline = unigram_entropy(val_batches)
    val_placed = [place_batch(b) for b in val_batches]
    flops_tok, peak = train_flops_per_token(mcfg, tcfg.seq_len), peak_flops()
    aux_coef = mcfg.router_aux_loss_coef
    primary = is_primary()
    logger = MetricsLogger(run_dir, tcfg.steps, start, tcfg.progress, enabled=primary)
    stop = _StopRequest()
    consecutive_bad, t_last, steps_since = 0, time.perf_counter(), 0
    val_loss = train_loss = math.nan
    try:
        for step in range(start, tcfg.steps):
            batch = place_batch(next(data.train))
            with mesh_scope():
                state, metrics = train_step(state, batch, graphdef=graphdef, optimizer=optimizer,
                                            grad_accum=tcfg.grad_accum, aux_coef=aux_coef, frozen=frozen)
            steps_since += 1
            logger.advance()
            if not bool(metrics["finite"]):
                skipped += 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                            step + 1, consecutive_bad)
                if consecutive_bad >= tcfg.max_bad_steps:
                    raise NonFiniteLoss(
                        f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                        f"(max_bad_steps={tcfg.max_bad_steps}); stopping at step {step + 1}. Lower "
                        f"learning_rate or check the data; the last good checkpoint is in {checkpoints.directory}"
                    )
            else:
                consecutive_bad = 0
            done = step + 1
            record: dict[str, Any] = {}
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                elapsed = time.perf_counter() - t_last
                tps = steps_since * tcfg.batch_size * tcfg.seq_len / elapsed
                train_loss = float(metrics["loss"])
                record.update(loss=train_loss, ce=metrics["ce"], aux_loss=metrics["aux_loss"],
                              expert_load=metrics["expert_load"], grad_norm=metrics["grad_norm"],
                              lr=float(schedule(step)), tokens_per_s=tps, skipped_steps=skipped)
                if peak is not None:
                    record["mfu"] = tps * flops_tok / peak
                t_last, steps_since = time.perf_counter(), 0
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                with mesh_scope():
                    val_loss = evaluate(state.params, graphdef, val_placed, frozen)
                record["val_loss"] = val_loss
                t_last, steps_since = time.perf_counter(), 0  # throughput counts training steps only
            if record:
                logger.log(done, record)
            extra = {"data": data.get_state(), "skipped_steps": skipped}
            if stop.signal is not None:
                checkpoints.save(done, state, extra, force=True)
                checkpoints.wait()
                log.warning("received signal %d: saved step %d to %s and stopped", stop.signal, done,
                            checkpoints.directory)
                break
            checkpoints.save(done, state, extra, force=done == tcfg.steps)
    finally:
        stop.restore()
        logger.close()
        checkpoints.close()

    model_dir, adapter_dir, sample = None, None, ""
    plot = plot_losses(run_dir, baseline) if primary else run_dir / "loss.png"
    if jax.process_count() == 1:
        model = nnx.merge(graphdef, state.params, *(() if frozen is None else (frozen,)))
        if lcfg.enabled:
            adapter_dir = save_adapters(model, run_dir / "adapter", lcfg, base=tcfg.init_from)
        else:
            model_dir = save_model(model, run_dir / "model", tokenizer=tokenizer)
        sample_seed = int(jax.random.randint(jax.random.wrap_key_data(state.rng), (), 0, 2**31 - 1))
        if template is None:
            sample = sample_text(model, tokenizer, tcfg.sample_prompt, tcfg.sample_tokens, seed=sample_seed)
        else:
            if template.source is not None and model_dir is not None:  # serve.py renders chats as trained
                (model_dir / "chat_template.jinja").write_text(template.source)
            reply = sample_reply(model, tokenizer, template, tcfg.sample_prompt, tcfg.sample_tokens, seed=sample_seed)
            sample = f"user: {tcfg.sample_prompt}\nassistant: {reply}"
    else:
        log.info("a multi-process run writes no model directory: the state is in %s; resume it in one process "
                 "(`steps=%d`, any mesh) to write the model and a sample", checkpoints.directory, int(state.step))
    summary = {"steps": int(state.step), "train_loss": train_loss, "val_loss": val_loss,
               "unigram_baseline": baseline, "skipped_steps": skipped,
               "model_dir": None if model_dir is None else str(model_dir),
               "adapter_dir": None if adapter_dir is None else str(adapter_dir),
               "checkpoints": str(checkpoints.directory), "plot": str(plot), "sample": sample}
    return summary


def config_summary(tcfg: TrainConfig, mcfg: MiniMaxConfig) -> dict[str, Any]:
    """The two configs as one JSON-able mapping (written beside the run's metrics)."""
    return {"train": dataclasses.asdict(tcfg), "model": mcfg.to_dict()}
