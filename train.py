"""Train or fine-tune a MiniMax model from one YAML config.

    python train.py --config configs/tiny.yaml [key=value ...] [model.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from minimax_jax.config import ConfigError
from minimax_jax.training.config import load_train_config
from minimax_jax.training.loop import NonFiniteLoss, config_summary, run
from sharding import initialize_distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (model fields as model.KEY=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        initialize_distributed()
        tcfg, mcfg = load_train_config(args.config, args.overrides)
        run_dir = Path(tcfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_summary(tcfg, mcfg), indent=2))
        summary = run(tcfg, mcfg)
    except (ConfigError, PermissionError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nfinished {summary['steps']} steps: train loss {summary['train_loss']:.3f}, "
          f"validation loss {summary['val_loss']:.3f} nats/token "
          f"(unigram baseline on the same tokens: {summary['unigram_baseline']:.3f})")
    print(f"model for load_model / serve.py: {summary['model_dir']}; checkpoints: {summary['checkpoints']}; "
          f"loss plot: {summary['plot']}")
    print(f"sample:\n{summary['sample']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
