"""Serve a MiniMax checkpoint over an OpenAI-compatible API: `python serve.py --help`.

In a multi-process job (SLURM, Open MPI, a Cloud TPU pod, a Kubernetes indexed Job) the job is
joined before the model loads; `--coordinator-address`, `--num-processes`, `--process-id` and
`--cluster` override what is detected (see sharding/distributed.py).
"""

import argparse
import sys

from sharding import distributed


def main(argv: list[str] | None = None) -> int:
    """Join the multi-process job (if any), then run the server with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    distributed.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    try:
        distributed.initialize(distributed.from_arguments(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from minimax_jax.serving.cli import main as serve

    return serve(rest)


if __name__ == "__main__":
    sys.exit(main())
