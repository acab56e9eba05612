"""MiniMax-VL-01's vision path on one GPU: the vision tower and projector beside PyTorch
(transformers' `CLIPVisionModel`), and the time to the first token of a request carrying one
image through the serving engine.

    python3 benchmarks/vision.py --out $OUT --batches 1,8,32 --image 1920x1080 --dtype bfloat16
    python3 benchmarks/vision.py --out /tmp/vision --tiny --dtype float32     # CPU smoke test

Tower rows (--batches, crops per call): the vision tower and projector of
configs/minimax-vl-01.yaml (CLIP ViT-L/14 at 336 px: hidden 1024, 24 layers, 16 heads,
intermediate 4096, exact GELU, no post-layernorm; projector 1024 -> 6144 -> 6144), random weights
(nnx.Rngs(0), in --dtype; biases zero and norms one, as initialised) copied through the checkpoint
name table into `CLIPVisionModel` (its default attention implementation, reported) and a torch
MLP (Linear, exact GELU, Linear). Both read the same random pixel values float32
[b, 3, 336, 336], already on the device (each casts them to --dtype inside). Timed: pixel values
-> projected features [b, 576, 6144] on the device; ours one jitted call blocked until ready,
torch one forward of the tower (hidden states of vision_feature_layer, CLS dropped) and the MLP
under `torch.inference_mode`, then `torch.cuda.synchronize`. Each the median of --repeats runs
after --warmup runs (ours after its compilation, compile_s). images/s = b / median; ratio = ours
images/s / torch images/s; max_rel_diff = max |ours - torch| / max |torch| over the features.

TTFT rows (--image WxH): one chat request holding one image (random pixels, a JPEG data URL)
through the serving engine, as the server takes it: the data URL decoded (image_decode_s), the
chat template rendered, tokenized and expanded by `serving.images.expand_prompt` (preprocess_s:
the anyres crops and the image tokens), then `Engine.submit(..., images=)` and greedy decoding of
one token: the engine's vision step (`Steps.image_features`: tower, projector and packing;
vision_s) and its prefill steps (prefill_s), each blocked until ready, within submission to the
first token (ttft_s; other_s is the rest of it: queueing, the slot's reset, gathering the chunk's
image tokens, reading the token back). total_s = image_decode_s + preprocess_s + ttft_s. The
model: the vision tower above (VL-01 width) on a small text model (configs/small.yaml with
benchmarks/long_context.py's PREFILL_OVERRIDES: hidden 512, 4 heads, 16 layers), one slot, the
whole prompt in one prefill chunk (unless --prefill-chunk). cold = the first request (compiles),
warm = the same request again (same shapes).

Progress lines go to stderr, one JSON line per row to stdout, all rows to --out/vision.json, and
the markdown tables for benchmarks/RESULTS.md to stdout and --out/vision.md. --tiny: a tiny tower
(2 layers of width 32, 28 px crops of 7 px patches, the VL-01 grids scaled by 28 / 336, projector
to width 64) on configs/tiny.yaml, which runs in a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.long_context import PREFILL_OVERRIDES  # noqa: E402
from benchmarks.serve import NoEosTokenizer  # noqa: E402
from benchmarks.softmax_attention import rel_err  # noqa: E402
from benchmarks.step_timing import median_time, peak_gib  # noqa: E402
from benchmarks.trace import no_command_buffers, profile  # noqa: E402
from benchmarks.trace import render as render_profile  # noqa: E402
from minimax_jax import MiniMaxConfig  # noqa: E402
from minimax_jax.hf_names import REMOTE  # noqa: E402
from minimax_jax.serving.chat import ChatTemplate  # noqa: E402
from minimax_jax.serving.engine import Engine, SamplingParams  # noqa: E402
from minimax_jax.serving.images import IMAGE_PLACEHOLDER, ImageInput, decode_data_url, expand_prompt  # noqa: E402
from minimax_jax.serving.steps import Steps  # noqa: E402
from minimax_jax.vision import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration  # noqa: E402
from minimax_jax.vision.config import PINPOINTS_VL_01  # noqa: E402
from minimax_jax.vision.hf_names import vl_entries  # noqa: E402
from minimax_jax.vision.projector import Projector  # noqa: E402
from minimax_jax.vision.vit import VisionTower  # noqa: E402

VL_01 = "configs/minimax-vl-01.yaml"
IMAGE_TOKEN = 260  # the TTFT model's image token: an id the byte tokenizer (258 ids) never produces
TINY_OVERRIDES = ["hidden_size=64", "vision.hidden_size=32", "vision.intermediate_size=64",
                  "vision.num_hidden_layers=2", "vision.num_attention_heads=4", "vision.image_size=28",
                  "vision.patch_size=7",
                  "vision.image_grid_pinpoints=" + json.dumps([[w // 12, h // 12] for w, h in PINPOINTS_VL_01])]
TINY_TEXT = "configs/tiny.yaml"
SMALL_TEXT = "configs/small.yaml"
TOWER_FILES = ((r"pallas_kernels/softmax[^/]*\.py$", "attention"), (r"minimax_jax/vision/vit\.py$", "tower"),
               (r"minimax_jax/vision/projector\.py$", "projector"))  # layer kinds of a profile


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def hf_vision_tensors(cfg: MiniMaxVLConfig, tower: VisionTower, projector: Projector) -> dict[str, np.ndarray]:
    """The released checkpoint's tensors (`vision_tower.*`, `multi_modal_projector.*`) of our
    tower and projector, through the name table, in float32 (exact for bf16 params)."""
    modules = {"vision_tower": tower, "multi_modal_projector": projector}
    ours = {(name, *path): np.asarray(v[...]) for name, module in modules.items()
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    tensors = {}
    for name, entries in vl_entries(cfg, REMOTE).items():
        e = entries[0]  # a vision tensor fills one block
        if e.path[0] in modules:
            tensors[name] = e.rule.to_hf(ours[e.path][e.index], cfg).astype(np.float32)
    return tensors


def torch_vision_path(cfg: MiniMaxVLConfig, tensors: dict[str, np.ndarray], dtype: str,
                      device: str) -> tuple[Callable, str]:
    """transformers' `CLIPVisionModel` (read by `from_pretrained` from the tower's tensors under
    their released names, `vision_model.*`) and a torch projector MLP holding `tensors` (from
    `hf_vision_tensors`), in `dtype` on `device`, and the function pixel_values `[N, 3, S, S]`
    -> features `[N, P, Dt]` they compute. Returns (that function, the tower's attention
    implementation)."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    v = cfg.vision
    torch_dtype = getattr(torch, dtype)
    prefix = "vision_tower."
    with tempfile.TemporaryDirectory() as tmp:
        transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
            num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act="gelu").save_pretrained(tmp)
        save_file({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)},
                  os.path.join(tmp, "model.safetensors"))
        clip, info = transformers.CLIPVisionModel.from_pretrained(tmp, dtype=torch_dtype, output_loading_info=True)
    if (info["unexpected_keys"] or info["mismatched_keys"]
            or any("post_layernorm" not in k for k in info["missing_keys"])):  # none in the released tower
        raise RuntimeError(f"CLIPVisionModel does not take the tower's tensors: {info}")
    projector = torch.nn.Sequential(torch.nn.Linear(v.hidden_size, cfg.text.hidden_size), torch.nn.GELU(),
                                    torch.nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size))
    projector.load_state_dict({f"{i}.{kind}": torch.from_numpy(tensors[f"multi_modal_projector.linear_{j}.{kind}"])
                               for i, j in ((0, 1), (2, 2)) for kind in ("weight", "bias")})
    clip, projector = clip.to(device).eval(), projector.to(device, torch_dtype).eval()
    layer = v.vision_feature_layer

    def features(pixel_values):
        if layer == -1:  # VL-01's: the last layer's output, read without capturing every layer's
            hidden = clip(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
        return projector(hidden[:, 1:])

    return features, clip.config._attn_implementation


def tower_rows(cfg: MiniMaxVLConfig, batches: list[int], dtype: str, warmup: int, repeats: int,
               emit: Callable[[dict], None], profile_dir: str | None = None) -> None:
    """Time our vision tower + projector against torch's at each batch of crops (see the module
    docstring); `emit` gets each row. profile_dir: also trace ours at each batch there
    (`benchmarks/trace.py`), the summary in the row's "profile"."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    v, dt = cfg.vision, jnp.dtype(dtype)
    rngs = nnx.Rngs(0)
    std = cfg.text.initializer_range
    tower = VisionTower(v, param_dtype=dt, dtype=dt, stddev=std, rngs=rngs)
    projector = Projector(v.hidden_size, cfg.text.hidden_size, param_dtype=dt, stddev=std, rngs=rngs)
    log(f"tower: {v.num_hidden_layers} layers of width {v.hidden_size}, {v.image_size} px crops of "
        f"{v.patch_size} px patches, projector {v.hidden_size} -> {cfg.text.hidden_size}, {dtype}; "
        f"copying the weights into torch ({device})")
    torch_features, attention = torch_vision_path(cfg, hf_vision_tensors(cfg, tower, projector), dtype, device)
    tower_def, tower_params = nnx.split(tower)
    projector_def, projector_params = nnx.split(projector)

    @jax.jit
    def features(tower_params, projector_params, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float32 `[N, 3, S, S]` -> projected features `[N, P, Dt]` in `dtype`."""
        return nnx.merge(projector_def, projector_params)(nnx.merge(tower_def, tower_params)(pixel_values))

    pixels = np.random.default_rng(0).standard_normal((max(batches), v.num_channels, v.image_size, v.image_size),
                                                      np.float32)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for b in batches:
        ours_in = jax.device_put(pixels[:b])
        torch_in = torch.from_numpy(pixels[:b]).to(device)
        log(f"{b} crops: compiling ours")
        t0 = time.perf_counter()
        ours_out = features(tower_params, projector_params, ours_in).block_until_ready()
        compile_s = time.perf_counter() - t0
        log(f"{b} crops: compiled in {compile_s:.1f} s; timing ours, then torch")
        run_ours = lambda: features(tower_params, projector_params, ours_in).block_until_ready()  # noqa: E731
        for _ in range(warmup):
            run_ours()
        ours_s = median_time(run_ours, repeats)
        with torch.inference_mode():
            torch_out = torch_features(torch_in)
            sync()

            def run_torch() -> None:
                torch_features(torch_in)
                sync()

            for _ in range(warmup):
                run_torch()
            torch_s = median_time(run_torch, repeats)
        row = {"kind": "tower", "batch": b, "dtype": dtype, "ours_images_per_s": b / ours_s,
               "torch_images_per_s": b / torch_s, "ratio": torch_s / ours_s, "ours_ms": 1e3 * ours_s,
               "torch_ms": 1e3 * torch_s, "compile_s": compile_s,
               "max_rel_diff": rel_err(ours_out, jnp.asarray(torch_out.float().cpu().numpy())),
               "features": list(ours_out.shape), "torch_attention": attention, "torch_device": device}
        if profile_dir:
            log(f"{b} crops: tracing ours")
            hlo = features.lower(tower_params, projector_params, ours_in).compile().as_text()
            row["profile"] = profile(run_ours, hlo, os.path.join(profile_dir, f"tower_{b}"), 3, TOWER_FILES)
        emit(row)


def image_request(cfg: MiniMaxVLConfig, url: str, tokenizer: NoEosTokenizer) -> tuple[list[int], ImageInput, dict]:
    """A chat request of one image (data URL) as the server reads it: (prompt ids with the image
    tokens, the preprocessed image, {image_decode_s, preprocess_s})."""
    t0 = time.perf_counter()
    image = decode_data_url(url)
    t1 = time.perf_counter()
    text = ChatTemplate().render([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}Describe this image."}])
    ids, images = expand_prompt(cfg, [tokenizer.encode(piece) for piece in text.split(IMAGE_PLACEHOLDER)], [image])
    return ids, images, {"image_decode_s": t1 - t0, "preprocess_s": time.perf_counter() - t1}


def first_token(engine: Engine, prompt: list[int], images: ImageInput, timeout: float = 3600) -> float:
    """Submit a greedy one-token request with images; seconds from submission to its token."""
    t0 = time.perf_counter()
    out = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), timeout, images=images)
    if not out.token_ids:
        raise RuntimeError(f"the request ended without a token: {out.finish_reason} {out.error}")
    return time.perf_counter() - t0


def timed_phases(steps: Steps, phases: dict[str, float]) -> None:
    """Make the engine's vision and prefill steps block until their results are ready and add
    their seconds to phases["vision_s"] and phases["prefill_s"]."""
    def timed(name: str, step: Callable) -> Callable:
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = jax.block_until_ready(step(*args, **kwargs))
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    steps.image_features = timed("vision_s", steps.image_features)
    steps.prefill = timed("prefill_s", steps.prefill)


def ttft_rows(cfg: MiniMaxVLConfig, width: int, height: int, chunk: int, emit: Callable[[dict], None]) -> None:
    """Time one request carrying a width x height image through the engine, cold then warm (see
    the module docstring); `emit` gets each row."""
    tokenizer = NoEosTokenizer()
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    model = MiniMaxVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    request = image_request(cfg, url, tokenizer)
    prompt, images, _ = request
    block = cfg.text.block_size
    chunk = chunk or -(-len(prompt) // block) * block
    engine = Engine(model, tokenizer, max_batch=1, max_context=len(prompt) + 1, prefill_chunk=chunk, prefill_rows=1)
    phases: dict[str, float] = {}
    timed_phases(engine.steps, phases)
    log(f"ttft: {width}x{height} image -> {len(images.pixel_values)} crops, {len(prompt)} prompt tokens, "
        f"prefill chunk {chunk}; text model hidden {cfg.text.hidden_size}, {cfg.text.num_hidden_layers} layers")
    engine.start()
    try:
        for run in ("cold", "warm"):
            phases.clear()
            log(f"{run} request" + (" (compiles the vision ops and the prefill)" if run == "cold" else ""))
            prompt, images, host = request if run == "cold" else image_request(cfg, url, tokenizer)
            ttft_s = first_token(engine, prompt, images)
            emit({"kind": "ttft", "run": run, "image": f"{width}x{height}", "crops": len(images.pixel_values),
                  "prompt_tokens": len(prompt), "prefill_chunk": chunk, "dtype": cfg.dtype, **host, **phases,
                  "other_s": ttft_s - phases["vision_s"] - phases["prefill_s"],
                  "ttft_s": ttft_s, "total_s": host["image_decode_s"] + host["preprocess_s"] + ttft_s,
                  "peak_gib": peak_gib()})
    finally:
        engine.stop()


def markdown(rows: list[dict]) -> str:
    """The rows as the markdown tables of benchmarks/RESULTS.md."""
    sections = []
    tower = [r for r in rows if r["kind"] == "tower"]
    if tower:
        head = (f"Vision tower + projector, {tower[0]['dtype']}, torch attention {tower[0]['torch_attention']}:\n\n"
                "| crops | ours images/s | torch images/s | ours / torch | ours ms | torch ms | max rel. diff |\n"
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        sections.append("\n".join([head] + [
            f"| {r['batch']} | {r['ours_images_per_s']:.1f} | {r['torch_images_per_s']:.1f} | {r['ratio']:.2f} "
            f"| {r['ours_ms']:.2f} | {r['torch_ms']:.2f} | {r['max_rel_diff']:.1e} |" for r in tower]))
    ttft = [r for r in rows if r["kind"] == "ttft"]
    if ttft:
        r0 = ttft[0]
        head = (f"Time to first token, one {r0['image']} image ({r0['crops']} crops, {r0['prompt_tokens']} prompt "
                f"tokens), {r0['dtype']}, seconds:\n\n"
                "| run | image decode | preprocess | vision | prefill | other | TTFT | total |\n"
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        sections.append("\n".join([head] + [
            f"| {r['run']} | {r['image_decode_s']:.3f} | {r['preprocess_s']:.3f} | {r['vision_s']:.3f} "
            f"| {r['prefill_s']:.3f} | {r['other_s']:.3f} | {r['ttft_s']:.3f} | {r['total_s']:.3f} |" for r in ttft]))
    sections += ["\n".join(render_profile(r["profile"], f"Ours at {r['batch']} crops"))
                 for r in tower if "profile" in r]
    return "\n\n".join(sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--batches", default="1,8,32", help="comma-separated crops per tower call ('' skips)")
    p.add_argument("--image", default="1920x1080", help="WxH of the TTFT request's image ('' skips)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--prefill-chunk", type=int, default=0, help="0: the whole prompt in one chunk")
    p.add_argument("--override", nargs="*", default=[],
                   help=f"KEY=value of {VL_01} (vision.KEY: the tower, both parts; KEY: the projector's width)")
    p.add_argument("--text-override", nargs="*", default=[], help="KEY=value of the TTFT rows' text model")
    p.add_argument("--tiny", action="store_true", help="tiny widths for a CPU smoke test")
    p.add_argument("--profile", metavar="DIR", help="trace our tower at each batch into DIR (the run's XLA "
                   "command buffers off: every kernel attributed to its op, all timings without them)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.profile:  # read when the backend starts, below
        os.environ.update(no_command_buffers(os.environ))
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave torch half of the GPU
    import torch
    import transformers

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    log(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {date}")
    cfg = MiniMaxVLConfig.from_yaml(VL_01, (TINY_OVERRIDES if args.tiny else []) + args.override)
    text = MiniMaxConfig.from_yaml(TINY_TEXT if args.tiny else SMALL_TEXT,
                                   ([] if args.tiny else PREFILL_OVERRIDES) + args.text_override)
    ttft_cfg = MiniMaxVLConfig(text.replace(dtype=args.dtype, param_dtype=args.dtype),
                               dataclasses.replace(cfg.vision, image_token_index=IMAGE_TOKEN))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "vision.json"), "w") as f:  # a run cut short keeps its rows
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__,
                       "transformers": transformers.__version__, "date": date, "overrides": args.override,
                       "text_overrides": args.text_override, "tiny": args.tiny, "rows": rows}, f, indent=1)

    batches = [int(b) for b in args.batches.split(",") if b]
    if batches:
        tower_rows(cfg, batches, args.dtype, args.warmup, args.repeats, emit, args.profile)
    if args.image:
        width, height = (int(x) for x in args.image.lower().split("x"))
        ttft_rows(ttft_cfg, width, height, args.prefill_chunk, emit)
    table = markdown(rows)
    print(table, flush=True)
    with open(os.path.join(args.out, "vision.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
