"""Training configuration: a YAML file with a `model:` section and training keys, plus
`key=value` overrides (`steps=100`, `model.hidden_size=128`); unknown keys are errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from minimax_jax.config import ConfigError, MiniMaxConfig, coerce_fields, parse_overrides, read_yaml
from minimax_jax.lora import LoraConfig
from sharding.distributed import DistributedConfig
from sharding.rules import MESH_AXES


DATA_FORMATS = ("text", "conversations")
LONG_CONVERSATIONS = ("truncate", "split")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `train.py` needs besides the model architecture.

    Data: `data` is a list of files or directories (or one path) (.txt/.md/.py text, .jsonl with a `text` field,
    .parquet with a `text` column); empty means the running interpreter's standard-library sources.
    `tokenizer`: None for bytes, or a local tokenizer.json. Rows of `seq_len` tokens are packed
    with segment ids; `val_fraction` of the documents are held out. `data_format: conversations`
    reads .jsonl rows of chat `messages` instead (`minimax_jax.training.conversations`; empty
    `data`: conversations about the standard library), rendered with the model's chat template,
    the loss on the assistant's replies only; `long_conversations` says what becomes of one longer
    than a row: `truncate` (each conversation whole in one row, a longer one cut to `seq_len`
    + 1 tokens) or `split` (packed end to end, continuing in the next row). The run ends with
    a sample: `sample_tokens` continuing `sample_prompt`, or with conversations the model's
    reply to `sample_prompt` as a user message (the chat template, as the server renders it).
    `mesh` (e.g. {data: 2, fsdp: 4}) shards params by their logical axes (`sharding.rules`) and
    batches over data x fsdp; None trains on one device (a multi-process job without one gets {data: -1}). `distributed`
    ({coordinator_address, num_processes, process_id, cluster}, see `sharding.distributed`) says
    how to join a multi-process job; None detects it from the environment. `lora`
    ({rank, alpha, targets, quantize}, see `minimax_jax.lora.LoraConfig`) trains low-rank
    adapters on the frozen `init_from` model; None or rank 0 trains every parameter.
    """

    run_dir: str = "runs/tiny"
    data: tuple[str, ...] = ()
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    val_fraction: float = 0.02
    data_format: str = "text"
    long_conversations: str = "truncate"
    steps: int = 1000
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_dir: str | None = None
    save_every: int = 200
    keep_checkpoints: int = 3
    resume: bool = True
    init_from: str | None = None
    max_bad_steps: int = 5
    mesh: dict[str, int] | None = None
    distributed: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 120
    progress: bool = True

    def __post_init__(self) -> None:
        data = (self.data,) if isinstance(self.data, str) else self.data or ()
        if not isinstance(data, (list, tuple)) or not all(isinstance(p, str) for p in data):
            raise ConfigError(f"data must be a list of file or directory paths, got {self.data!r}")
        object.__setattr__(self, "data", tuple(data))
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every",
                    "eval_batches", "save_every", "keep_checkpoints", "max_bad_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for key, choices in (("data_format", DATA_FORMATS), ("long_conversations", LONG_CONVERSATIONS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key} must be one of {list(choices)}, got {getattr(self, key)!r}")
        try:
            DistributedConfig.from_mapping(self.distributed)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"distributed: {e}") from None
        if self.lora_settings.enabled and self.init_from is None:
            raise ConfigError("lora.rank > 0 trains adapters on a frozen base: set init_from to its checkpoint")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")

    @property
    def checkpoints(self) -> Path:
        """Where the training checkpoints go (default: `run_dir`/checkpoints)."""
        return Path(self.checkpoint_dir or Path(self.run_dir) / "checkpoints")

    @property
    def distributed_settings(self) -> DistributedConfig:
        """The `distributed:` mapping as a DistributedConfig."""
        return DistributedConfig.from_mapping(self.distributed)

    @property
    def lora_settings(self) -> LoraConfig:
        """The `lora:` mapping as a LoraConfig (rank 0: full fine-tuning)."""
        return LoraConfig.from_mapping(self.lora)


SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def check_seq_len(tcfg: TrainConfig, mcfg: MiniMaxConfig) -> None:
    """Raise a ConfigError naming both numbers if `seq_len` exceeds the model's positions."""
    if tcfg.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"seq_len ({tcfg.seq_len}) is larger than the model's max_position_embeddings "
                          f"({mcfg.max_position_embeddings})")


def load_train_config(path: str | Path, overrides: Iterable[str] = ()) -> tuple[TrainConfig, MiniMaxConfig]:
    """Read a YAML file and apply `key=value` overrides -> (TrainConfig, MiniMaxConfig).

    Training keys are top-level; model keys live under `model:` and are overridden as `model.KEY`,
    mesh axis sizes as `mesh.AXIS` (or the whole `mesh={...}`), multi-process settings as
    `distributed.KEY`, adapter settings as `lora.KEY`.
    A config needs a `model:` section (or `init_from`): without one no model is built. Every
    problem is a ConfigError naming the file.
    """
    raw = read_yaml(path)
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    valid = (train_keys + [f"model.{k}" for k in MiniMaxConfig.field_names()]
             + [f"mesh.{a}" for a in MESH_AXES]
             + [f"distributed.{f.name}" for f in dataclasses.fields(DistributedConfig)]
             + [f"lora.{k}" for k in LoraConfig.field_names()])
    unknown = sorted(set(raw) - set(train_keys) - {"model"})
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
    train = {k: v for k, v in raw.items() if k != "model"}
    if not isinstance(raw.get("model") or {}, dict):
        raise ConfigError(f"{path}: model: must be a mapping of model keys, got {raw['model']!r}")
    model = dict(raw.get("model") or {})
    for key, value in parse_overrides(overrides, valid).items():
        if key.startswith("model."):
            model[key.removeprefix("model.")] = value
        elif key.startswith(("mesh.", "distributed.", "lora.")):
            group, name = key.split(".", 1)
            train[group] = {**(train.get(group) or {}), name: value}
        else:
            train[key] = value
    if not model and not train.get("init_from"):
        shipped = ", ".join(sorted(str(p) for p in SHIPPED_CONFIGS.glob("*.yaml"))) or "configs/*.yaml"
        raise ConfigError(f"{path}: no model: section (and no init_from), so no model to train; "
                          f"start from a shipped config: {shipped}")
    try:
        tcfg, mcfg = TrainConfig(**coerce_fields(TrainConfig, train)), MiniMaxConfig.from_mapping(model)
        check_seq_len(tcfg, mcfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return tcfg, mcfg
