"""Serve a MiniMax checkpoint over an OpenAI-compatible API: `python serve.py --help`."""

import sys

from minimax_jax.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
