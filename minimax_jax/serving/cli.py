"""`python serve.py`: serve a checkpoint over the OpenAI-compatible API.

    python serve.py [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--max-batch 8]
                    [--max-context 2048] [--prefill-chunk 256] [--prefill-rows 4] [--page-size 16]
                    [--kv-pages N] [--dtype float32] [--quantize int8|fp8] [--model-name NAME]
                    [--decode-steps 8] [--prefix-cache-slots 32] [--no-prefix-cache]
                    [--mesh data=2,tensor=2,expert=2] [--debug]

DIR is an HF directory or one of our Orbax checkpoints (default: runs/tiny/model, what
`python train.py --config configs/tiny.yaml` writes). `--mesh` serves on a mesh over all visible
devices (train.py's mesh axes data, fsdp, expert and tensor; missing axes are 1, one may be -1; a
sequence axis is refused): the model loads straight into its shards and the engine's steps run
under the mesh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from minimax_jax.cache import PAGE_SIZE
from minimax_jax.config import ConfigError, parse_overrides
from sharding.rules import MESH_AXES

DEFAULT_CHECKPOINT = Path("runs/tiny/model")


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,tensor=2,expert=2` -> {"data": 2, "tensor": 2, "expert": 2} (the `mesh.AXIS=N`
    overrides of train.py, comma-separated); an unknown axis, a missing `=` or a size that is
    not a positive integer (or -1: the remaining devices) is an argparse.ArgumentTypeError
    naming it."""
    try:
        sizes = parse_overrides([item for item in text.split(",") if item], MESH_AXES)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("config key", "mesh axis")) from None
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise argparse.ArgumentTypeError(f"mesh axis {axis}={size!r}: the size must be a positive "
                                             f"integer (or -1 for the remaining devices)")
    if not sizes:
        raise argparse.ArgumentTypeError(f"no mesh axes in {text!r}; e.g. data=2,tensor=2,expert=2")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"HF or Orbax checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="slots decoded together")
    p.add_argument("--max-context", type=int, default=2048, help="prompt + generated tokens per request")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step")
    p.add_argument("--prefill-rows", type=int, default=4, help="prompts prefilled together per step")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, help="tokens per K/V page")
    p.add_argument("--kv-pages", type=int, default=None,
                   help="K/V pages shared by all slots; a request waits until its prompt + "
                        "max_tokens fit (default: every slot at full context)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantize", default=None, choices=("int8", "fp8"),
                   help="int8 / fp8 expert and attention projections (per-channel scales); "
                        "a quantized checkpoint loads quantized without it")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="tokens per slot per decode dispatch, generated on the device; a waiting "
                        "request joins between dispatches (1: one token per dispatch)")
    p.add_argument("--prefix-cache-slots", type=int, default=32,
                   help="prompt prefixes kept for reuse, each holding a copy of one slot's lightning "
                        "states (evicted least recently used first)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not cache prompt prefixes")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--mesh", type=parse_mesh, default=None, metavar="AXIS=N,...",
                   help=f"serve on a mesh over all visible devices, axes {', '.join(MESH_AXES)} (e.g. "
                        f"data=2,tensor=2,expert=2; the sizes must multiply to the device count; "
                        f"serving splits no sequence axis)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load, warm up, serve until interrupted. User errors (a bad checkpoint, sizes, a cache that
    does not fit in memory) print one line and return 1 (with --debug: the traceback); usage
    errors return 2."""
    args = parse_args(argv)
    if not args.checkpoint.is_dir():
        hint = ("train one with `python train.py --config configs/tiny.yaml`, or "
                if args.checkpoint == DEFAULT_CHECKPOINT else "")
        print(f"error: no checkpoint at {args.checkpoint}; {hint}pass --checkpoint DIR", file=sys.stderr)
        return 1
    from minimax_jax.checkpoint import CheckpointError, load_model
    from minimax_jax.serving.server import build
    from minimax_jax.tokenizer import load_tokenizer
    from sharding import make_mesh

    try:
        mesh = None if args.mesh is None else make_mesh(args.mesh)
        model = load_model(args.checkpoint, dtype=args.dtype, quantize=args.quantize, mesh=mesh)
        tokenizer = load_tokenizer(args.checkpoint)
        served = build(model, tokenizer, model_name=args.model_name or args.checkpoint.resolve().name,
                       checkpoint_dir=args.checkpoint, max_batch=args.max_batch,
                       max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                       prefill_rows=args.prefill_rows, page_size=args.page_size,
                       kv_pages=args.kv_pages, decode_steps=args.decode_steps,
                       prefix_cache_slots=0 if args.no_prefix_cache else args.prefix_cache_slots)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        uvicorn.run(served.app, host=args.host, port=args.port, log_level="info")
    finally:
        served.close()
    return 0
