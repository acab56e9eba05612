"""Train or fine-tune a MiniMax model from one YAML config.

    python train.py --config configs/tiny.yaml [key=value ...] [model.key=value ...]
                    [--no-verify] [--allow-non-finite] [--debug]
                    [--coordinator-address HOST:PORT --num-processes N --process-id I]

Under SLURM, Open MPI, a Cloud TPU pod or a Kubernetes indexed Job every process runs the same
command and the job is joined automatically (see sharding/distributed.py); the coordinator flags
(or `distributed.KEY=value`) override what is detected. Process 0 alone logs and writes the run's
files.

A bad config, data file or checkpoint prints one line `error: ...` and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from minimax_jax.training.checkpointing import ensure_writable
from minimax_jax.training.config import load_train_config
from minimax_jax.training.loop import NonFiniteLoss, config_summary, run
from sharding import distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (model fields as model.KEY=value)")
    parser.add_argument("--no-verify", action="store_true",
                        help="resume and init_from without checking the checkpoints' checksums")
    parser.add_argument("--allow-non-finite", action="store_true", help="accept NaN / Inf weights in init_from")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        tcfg, mcfg = load_train_config(args.config, args.overrides)
        distributed.initialize(distributed.from_arguments(args, tcfg.distributed_settings))
        if not distributed.is_primary():
            logging.getLogger().setLevel(logging.ERROR)
        run_dir = Path(tcfg.run_dir)
        ensure_writable(run_dir, "run directory")
        if distributed.is_primary():
            (run_dir / "config.json").write_text(json.dumps(config_summary(tcfg, mcfg), indent=2))
        summary = run(tcfg, mcfg, verify=not args.no_verify, allow_non_finite=args.allow_non_finite)
    except (ValueError, OSError, NonFiniteLoss) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_primary():
        return 0
    print(f"\nfinished {summary['steps']} steps: train loss {summary['train_loss']:.3f}, "
          f"validation loss {summary['val_loss']:.3f} nats/token "
          f"(unigram baseline on the same tokens: {summary['unigram_baseline']:.3f})")
    if summary["model_dir"] is None:
        print(f"checkpoints: {summary['checkpoints']} (resume in one process to write the model); "
              f"loss plot: {summary['plot']}")
        return 0
    print(f"model for load_model / serve.py: {summary['model_dir']}; checkpoints: {summary['checkpoints']}; "
          f"loss plot: {summary['plot']}")
    print(f"sample:\n{summary['sample']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
