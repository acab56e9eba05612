"""Training metrics: analytic FLOPs and MFU, and the logs (terminal, JSONL, TensorBoard, PNG plot)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from minimax_jax.checkpoint import write_text_atomic
from minimax_jax.config import FULL, MiniMaxConfig
from pallas_kernels import LIGHTNING_CHUNK

# Dense bf16 peak FLOP/s by device kind (substring match, first hit wins).
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def train_flops_per_token(cfg: MiniMaxConfig, seq_len: int) -> float:
    """Analytic training FLOPs per token (forward + backward = 3x forward).

    Forward: 2 FLOPs per active matmul weight (attention projections, router, top-k experts,
    lm_head), plus softmax attention 2 * 2 * H * K * seq_len / 2 (causal) per softmax layer and
    lightning attention 2 * H * K * (C + 2 K) per lightning layer, C = the op's block length
    `pallas_kernels.LIGHTNING_CHUNK` (intra-block products and the state read and update).
    """
    d, h, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    moe = cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size + d * cfg.num_local_experts
    total = 2.0 * d * cfg.vocab_size
    for t in cfg.layer_types:
        if t == FULL:
            proj = 2 * d * h * k + 2 * d * n * k
            attn = 2.0 * h * k * seq_len
        else:
            proj = 5 * d * h * k
            attn = 2.0 * h * k * (min(LIGHTNING_CHUNK, seq_len) + 2 * k)
        total += 2.0 * (proj + moe) + attn
    return 3.0 * total


def peak_flops() -> float | None:
    """Total dense bf16 peak of the visible devices, or None when unknown (e.g. a CPU)."""
    devices = jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None


log = logging.getLogger("minimax_jax.training")


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the `metrics.jsonl` at `path` without the records of steps after `step` (they
    are about to be run again) and without lines cut short by a killed run; logs what it drops."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (s := _record_step(line)) is not None and s <= step]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        log.info("%s: dropped %d line(s) after step %d (those steps run again now)", path,
                 len(lines) - len(kept), step)


def _record_step(line: str) -> int | None:
    """The step of one `metrics.jsonl` line, or None for a line that is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLogger:
    """Writes every record to `metrics.jsonl` and TensorBoard under `run_dir`, and shows progress.

    Records of steps after `start_step` left by an earlier run are dropped first, so a resumed
    run logs each step once. With `enabled=False` (every process of a job but the first) it
    writes and shows nothing."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool, *, enabled: bool = True):
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        drop_records_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step")

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Record scalar (and list) metrics for `step`."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, float):
                self.tb.add_scalar(key, value, step)
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/{i}", v, step)
        shown = {k: v for k, v in record.items() if k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {step}: {text}", flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tb.close()


def _plain(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return float(arr) if arr.dtype.kind == "f" else arr.item()
    return [float(v) for v in arr.reshape(-1)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` file (a resumed run appends to the same file)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path, baseline: float | None = None) -> Path:
    """Plot training and validation loss from `metrics.jsonl` to `loss.png`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
