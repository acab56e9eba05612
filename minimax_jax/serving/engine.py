"""The serving engine: one background thread, continuous batching over fixed slots.

Each loop iteration: take new requests and aborts; put waiting requests into free slots, oldest
first, as long as the K/V pool has the pages a request needs for its prompt plus max_tokens; run one
prefill chunk for each of the (up to `prefill_rows`) oldest slots still reading a prompt (so a
long prompt never stalls the others for more than one chunk); run one decode dispatch for every
slot that is generating: up to `decode_steps` tokens per slot in one compiled loop on the device
(sampling and the stop tokens inside it), read back once. Outputs go to each request's callback
once per dispatch, with the tokens it produced; a request's pages return to the pool when it
ends. This thread is the only code that touches device arrays.

Stop strings and max_tokens are checked on the host over the tokens of a dispatch in order; tokens
after the one that ends a request are dropped, so the output is the same as one token per
dispatch. Constrained requests (`SamplingParams.constraint`) need their grammar's mask before each
token: a dispatch with one of them in the batch runs one token for every slot.

With the prefix cache on (`prefix_cache_slots` > 0), prompts are read in chunks of exactly
prefill_chunk or a power of two tokens (no padding), so a prompt's token i sits at K/V slot i and
its whole pages can be shared; after a chunk that ends on a page boundary, the prefix read so far
is cached (`minimax_jax.serving.prefix`): its pages by reference and a snapshot of its lightning
states. A new request whose prompt starts with a cached prefix (all but at least its last token)
gets those pages and that snapshot, and reads only the rest: the same computation as reading the
whole prompt, in the same chunks when the prefix ends on a multiple of prefill_chunk (the logits
are then bitwise equal), otherwise in another split of the same tokens (equal up to float
rounding). Scored prompts (prompt_logprobs) are always read whole.

Prompt logprobs (`SamplingParams.prompt_logprobs`) come from the prefill steps themselves: a
prefill step that reads a scored prompt also returns, per position, the logprob of the next prompt
token and the most likely alternatives (its logits computed a few positions at a time); steps
without a scored prompt compute logits at the last position only.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import random
import threading
import time
import traceback
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from minimax_jax.cache import PAGE_SIZE
from minimax_jax.memory import require_memory
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.images import ImageInput
from minimax_jax.serving.metrics import Metrics
from minimax_jax.serving.pages import PageAllocator
from minimax_jax.serving.prefix import CachedPrefix, PrefixCache, block_chain
from minimax_jax.serving.sampling import (MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, TOP_LOGPROBS, Sampled,
                                          SamplingBatch, SamplingRow)
from minimax_jax.serving.steps import Steps, cache_bytes, prefix_store_bytes
from minimax_jax.serving.textstream import TextStream
from minimax_jax.tokenizer import Tokenizer
from minimax_jax.vision.anyres import image_token_count
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration, text_model
from sharding.experts import EXPERT
from sharding.mesh import local_devices_first, placed_mesh
from sharding.tokens import BATCH_AXES, SEQUENCE

log = logging.getLogger(__name__)
MIN_PREFILL_BUCKET = 16  # the shortest prefill step


def prefill_buckets(chunk: int, smallest: int = MIN_PREFILL_BUCKET) -> tuple[int, ...]:
    """The prefill lengths for a prefill chunk of `chunk` tokens: the powers of two from
    `smallest` below `chunk`, then `chunk` (at most 1 + ceil(log2(chunk / smallest)) of them)."""
    sizes = []
    while smallest < chunk:
        sizes.append(smallest)
        smallest *= 2
    return (*sizes, chunk)


def check_serving_mesh(mesh: Mesh, rows: dict[str, int]) -> None:
    """Raise a ValueError naming the mesh and what is wrong unless the engine can serve on it with
    steps of `rows` ({setting name: rows per step}): all its devices in this process (the engine
    reads every step's tokens on its host), no `sequence` axis (a decode step feeds one token per
    slot) and, with an `expert` axis, rows that split over the batch axes (data x fsdp x expert)."""
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError(f"mesh {dict(mesh.shape)} spans several processes; the engine reads every step's "
                         f"tokens on its own host, so it serves on one process's devices only")
    if mesh.shape.get(SEQUENCE, 1) > 1:
        raise ValueError(f"mesh {dict(mesh.shape)} splits the {SEQUENCE} axis, which serving cannot: a decode "
                         f"step feeds one token per slot; use the data, fsdp, expert and tensor axes")
    if mesh.shape.get(EXPERT, 1) > 1:
        ways = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
        for name, n in rows.items():
            if n % ways:
                raise ValueError(f"{name} ({n}) must be a multiple of {ways} on mesh {dict(mesh.shape)}: its "
                                 f"expert axis needs every step's rows split over {list(BATCH_AXES)}")


class ContextLengthError(ValueError):
    """A request's prompt plus max_tokens does not fit in the engine's context or K/V pool."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate: at most `max_tokens` tokens (0: only read the prompt); temperature 0 is
    greedy; top_k 0 and top_p 1 are off; `seed` None draws one; generation stops at EOS (unless
    `ignore_eos`), at any of `stop_token_ids` (neither can be sampled before `min_tokens`
    tokens) or at any of the `stop` strings; `logprobs` None returns none, n >= 0 returns the
    chosen token's logprob and the n most likely alternatives; `prompt_logprobs` n >= 0 does the
    same for every prompt token after the first. `logit_bias` (token id -> bias) and the
    penalties shape the logits sampled from (see `minimax_jax.serving.sampling`);
    `constraint` makes a fresh `TokenMask` for each request, whose allowed tokens are the only
    ones it can sample (constrained decoding)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Callable[[], "TokenMask"] | None = None

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {TOP_LOGPROBS}], got {value}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or not all(-100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} biases in [-100, 100]")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")


class TokenMask(Protocol):
    """The tokens one request may sample next; told each token it generates."""

    def allowed(self) -> np.ndarray:
        """bool `[V]` over the model's vocabulary."""

    def accept(self, token: int) -> None:
        """The request generated `token`."""


@dataclasses.dataclass
class TokenLogprob:
    """One token: its id, its logprob, and the most likely (id, logprob) alternatives; logprob
    and top are None for a token nothing precedes (the first of a prompt)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclasses.dataclass
class Output:
    """What a request produced since its last output. `finish_reason` is None while it runs,
    then "stop" (EOS, a stop token or a stop string), "length" (max_tokens), "abort" or "error"
    (see `error`). `prompt_logprobs`, in a request's first output when it asked for them: one
    entry per prompt token (the first one's logprob None)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    on_output: Callable[[Output], None]
    stream: TextStream
    arrival: float
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)  # K/V pages held while in a slot
    fed: int = 0  # prompt tokens prefilled so far
    generated: list[int] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # filled chunk by chunk when asked for
    done: bool = False  # finished; its slot is free
    mask: TokenMask | None = None  # constrained decoding (SamplingParams.constraint)
    last_token: float = 0.0  # when its last token was generated (time.monotonic)
    chain: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of its whole pages
    images: ImageInput | None = None  # a VL model's images (never prefix-cached: their tokens are all alike)
    features: jax.Array | None = None  # their image tokens [n, D], computed at the first prefill chunk
    feature_index: np.ndarray | None = None  # [prompt length]: the image token each position reads

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt)

    def sampling_row(self) -> SamplingRow:
        p = self.params
        return SamplingRow(self.seed, len(self.generated), p.temperature, p.top_p, p.top_k, p.min_tokens,
                           p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.logprobs or 0)


class Engine:
    """Continuous batching of `max_batch` slots of up to `max_context` tokens (prompt plus
    generated) each; prompts are prefilled `prefill_chunk` tokens at a time, for up to
    `prefill_rows` prompts per step. The softmax layers' K/V live in a pool of `kv_pages` pages
    of `page_size` tokens (default: enough for every slot at full context); a request holds the
    pages for its prompt plus max_tokens from admission to its end, and waits in the queue
    while too few are free.

    A prompt's first chunk is its remainder (1 to prefill_chunk tokens); a prefill step runs at
    the smallest length of `buckets` (`prefill_buckets`: powers of two from MIN_PREFILL_BUCKET,
    then prefill_chunk) that holds every row's tokens, so a short prompt pays for a short step.
    Compiled shapes are bounded: one decode step, one reset, and one prefill per bucket (two
    when prompts are scored): at most 2 + 2 * (1 + ceil(log2(prefill_chunk / MIN_PREFILL_BUCKET)))
    programs, 12 for a prefill chunk of 256. Constrained requests (`SamplingParams.constraint`)
    add the same steps taking an allowed-token mask, compiled on first use: at most twice as many.

    `decode_steps` > 1: each decode dispatch generates up to that many tokens per slot on the
    device (one more compiled program; see the module docstring); a waiting request joins at the
    next dispatch, so it waits at most decode_steps decode steps. `prefix_cache_slots` > 0 turns
    on the prefix cache with that many lightning-state snapshots (each the size of one slot's
    lightning states); prompts are then read in chunks of prefill_chunk and the powers of two below
    it (the buckets start at 1), pages of cached prefixes stay held (and count as used) until
    their entry is evicted, least recently used first, when a snapshot or an admission needs room.

    A VL model's requests may carry images (`submit(..., images=)`, one image token per position
    they fill): the vision tower runs at the request's first prefill chunk, and each chunk reads
    the image tokens' embeddings in place of those positions' token embeddings. Such requests
    bypass the prefix cache (their image tokens are all the same id).

    A model placed on a mesh (`load_model(..., mesh=)`) is served on it: every step runs under
    that mesh, the cache split as `steps.cache_shardings` says (rows over the batch axes, heads
    over `tensor`), and the memory check counts each device's share against the mesh's devices.
    With an `expert` axis every step's rows must split over the batch axes (data x fsdp x
    expert), so max_batch and prefill_rows must be multiples of their product; a `sequence` axis
    is refused (a decode step's one token per slot cannot be split), as is a mesh over several
    processes (the engine reads the tokens on its host).

    Use: `start()`, then `submit(prompt_ids, params, on_output)` from any thread (outputs arrive
    on the engine thread), `abort(request_id)`, `reset_prefix_cache()`, `stop()`.
    `generate(...)` blocks for one result.
    """

    def __init__(self, model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration, tokenizer: Tokenizer, *,
                 max_batch: int = 8, max_context: int = 2048, prefill_chunk: int = 64, prefill_rows: int = 4,
                 page_size: int = PAGE_SIZE, kv_pages: int | None = None,
                 metrics: Metrics | None = None, decode_steps: int = 1, prefix_cache_slots: int = 0):
        cfg = text_model(model).config
        self.vl_config = model.config if isinstance(model, MiniMaxVLForConditionalGeneration) else None
        if min(max_batch, prefill_chunk, prefill_rows, page_size, decode_steps) < 1:
            raise ValueError(f"max_batch, prefill_chunk, prefill_rows, page_size and decode_steps must be "
                             f">= 1, got {max_batch}, {prefill_chunk}, {prefill_rows}, {page_size}, {decode_steps}")
        if prefix_cache_slots < 0:
            raise ValueError(f"prefix_cache_slots must be >= 0, got {prefix_cache_slots}")
        if not 2 <= max_context <= cfg.max_position_embeddings:
            raise ValueError(f"max_context must be in [2, max_position_embeddings = "
                             f"{cfg.max_position_embeddings}], got {max_context}")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {cfg.vocab_size}")
        mesh = placed_mesh(nnx.state(model))
        if mesh is not None:
            check_serving_mesh(mesh, {"max_batch": max_batch, "prefill_rows": min(prefill_rows, max_batch)})
        self.tokenizer, self.vocab_size = tokenizer, cfg.vocab_size
        self.max_batch, self.max_context, self.chunk = max_batch, max_context, prefill_chunk
        self.aligned = prefix_cache_slots > 0  # prompts read without padding, token i at K/V slot i
        self.buckets = prefill_buckets(prefill_chunk, 1 if self.aligned else MIN_PREFILL_BUCKET)
        self.page_size = page_size
        # the first chunk of a padded prompt is left-padded: up to chunk - 1 more K/V slots
        pages_per_slot = -(-(max_context + (0 if self.aligned else prefill_chunk - 1)) // page_size)
        num_pages = max_batch * pages_per_slot if kv_pages is None else kv_pages
        require_memory(cache_bytes(cfg, slots=max_batch, pages_per_slot=pages_per_slot,
                                   page_size=page_size, num_pages=num_pages, mesh=mesh)
                       + prefix_store_bytes(cfg, prefix_cache_slots, mesh),
                       f"the cache of {max_batch} slots and {num_pages} K/V pages of {page_size} tokens",
                       None if mesh is None else local_devices_first(mesh),
                       hint="lower --max-batch, --max-context, --kv-pages or --prefix-cache-slots")
        self.pages = PageAllocator(num_pages)
        self.prefix = PrefixCache(prefix_cache_slots, page_size, self.pages) if self.aligned else None
        self.steps = Steps(model, slots=max_batch, pages_per_slot=pages_per_slot,
                           page_size=page_size, num_pages=self.pages.num_pages,
                           prefill_rows=min(prefill_rows, max_batch), decode_steps=decode_steps,
                           prefix_snapshots=prefix_cache_slots)
        self.metrics = metrics or Metrics()
        self.metrics.set_kv_pages(0, self.pages.num_pages)
        self._cond = threading.Condition()
        self._incoming: list[_Request] = []
        self._aborts: set[str] = set()
        self._stopping = False
        self._reset_prefixes = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._slots: list[_Request | None] = [None] * max_batch

    # ----- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="minimax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request (empty or too long prompt,
        ids out of the vocabulary, settings out of range)."""
        params.check()
        if not prompt:
            raise ValueError("the prompt is empty")
        for name, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", list(params.logit_bias))):
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                raise ValueError(f"{name} token ids must be in [0, {self.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens; the request "
                f"has {len(prompt)} prompt tokens + max_tokens {params.max_tokens}")
        need = self.pages_needed(len(prompt), params.max_tokens)
        if need > self.pages.num_pages:
            raise ContextLengthError(
                f"the request needs {need} K/V pages of {self.page_size} tokens for {len(prompt)} "
                f"prompt tokens + max_tokens {params.max_tokens}; the K/V pool holds "
                f"{self.pages.num_pages} pages")

    def check_images(self, prompt: list[int], images: ImageInput | None) -> None:
        """Raise ValueError unless the prompt's image tokens are exactly those `images` make (none
        without images; images only for a VL model)."""
        if self.vl_config is None:
            if images is not None:
                raise ValueError("images need a VL model; this one reads text only")
            return
        vision = self.vl_config.vision
        have = prompt.count(vision.image_token_index)
        want = 0 if images is None else sum(image_token_count(vision, h, w) for h, w in images.image_sizes.tolist())
        if have != want:
            raise ValueError(f"prompt holds {have} image token(s) (id {vision.image_token_index}) but the "
                             f"images make {want}")

    def _prompt_slots(self, prompt_tokens: int) -> int:
        """K/V slots a prompt fills: its tokens, and without the prefix cache the padding of its
        first chunk (left-padded to at most a whole chunk)."""
        return prompt_tokens if self.aligned else -(-prompt_tokens // self.chunk) * self.chunk

    def pages_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """K/V pages a request holds (those of a cached prefix included): its prompt's slots plus
        max_tokens - 1 decoded tokens (the last one is never fed back)."""
        slots = self._prompt_slots(prompt_tokens) + max(max_tokens - 1, 0)
        return -(-slots // self.page_size)

    def max_new_tokens(self, prompt_tokens: int) -> int:
        """The largest max_tokens a prompt of `prompt_tokens` tokens can ask for: what fits in
        max_context and in the whole K/V pool (at least 1, which `check` may still refuse)."""
        prompt_slots = self._prompt_slots(prompt_tokens)
        pool_room = self.pages.num_pages * self.page_size - prompt_slots + 1
        return max(min(self.max_context - prompt_tokens, pool_room), 1)

    def submit(self, prompt: list[int], params: SamplingParams,
               on_output: Callable[[Output], None], images: ImageInput | None = None) -> str:
        """Queue a request (checked first, see `check`); returns its id. `on_output` is called on
        the engine thread with every `Output`; the last one has a finish_reason. A VL model's
        `images` fill the prompt's image tokens, which must be as many as they make."""
        self.check(prompt, params)
        self.check_images(prompt, images)
        seed = random.getrandbits(32) if params.seed is None else params.seed
        request = _Request(f"req-{next(self._ids)}", list(prompt), params, seed, on_output,
                           TextStream(self.tokenizer, params.stop), time.monotonic(),
                           mask=None if params.constraint is None else params.constraint(),
                           chain=block_chain(prompt, self.page_size) if self.aligned and images is None else [],
                           images=images)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [TokenLogprob(prompt[0], None, None)]
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._incoming.append(request)
            self._cond.notify()
        self.metrics.add_prompt(len(prompt))
        return request.id

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix before the next request is admitted (their pages go back to
        the pool once no running request reads them); nothing to do without a prefix cache."""
        with self._cond:
            self._reset_prefixes = True
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); its slot is freed on the next iteration."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def generate(self, prompt: list[int], params: SamplingParams, timeout: float = 600,
                 images: ImageInput | None = None) -> Output:
        """Submit (with a VL model's `images`, as `submit` takes them) and wait: all outputs of one
        request merged into one (blocking)."""
        done = threading.Event()
        parts: list[Output] = []

        def collect(out: Output) -> None:
            parts.append(out)
            if out.finish_reason is not None:
                done.set()

        self.submit(prompt, params, collect, images=images)
        if not done.wait(timeout):
            raise TimeoutError(f"no result within {timeout} s")
        return merge_outputs(parts)

    # ----- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._incoming or self._aborts or self._waiting
                           or self._reset_prefixes or any(self._slots)):
                    self._cond.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                aborts, self._aborts = self._aborts, set()
                reset_prefixes, self._reset_prefixes = self._reset_prefixes, False
            if reset_prefixes and self.prefix is not None:
                self.prefix.clear()
            try:
                self._iterate(aborts)
            except Exception as exc:  # noqa: BLE001 - keep serving: fail what was in flight
                self._step_failed([r for r in self._slots if r is not None], exc)
        with self._cond:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for request in [*self._waiting, *filter(None, self._slots)]:
            self._finish(request, "abort")

    def _iterate(self, aborts: set[str]) -> None:
        self._apply_aborts(aborts)
        self._admit()
        self._prefill_step()
        self._decode_step()
        self._publish_load()

    def _publish_load(self) -> None:
        with self._cond:
            queued = len(self._waiting) + len(self._incoming)
        self.metrics.set_load(queued, sum(r is not None for r in self._slots))
        self.metrics.set_kv_pages(self.pages.used, self.pages.free)
        if self.prefix is not None:
            self.metrics.set_prefix_cache(len(self.prefix), self.prefix.pages_held)

    def _apply_aborts(self, ids: set[str]) -> None:
        for request in [r for r in [*self._waiting, *self._slots] if r is not None and r.id in ids]:
            self._finish(request, "abort")

    def _reading(self) -> list[_Request]:
        """Requests in slots still reading their prompt, oldest first (at most prefill_rows)."""
        return sorted((r for r in self._slots if r is not None and not r.decoding), key=lambda r: r.arrival)

    def _admit(self) -> None:
        """Move waiting requests, oldest first, into free slots with the K/V pages they need,
        keeping at most prefill_rows slots reading a prompt (the decode step protects those rows,
        a fixed number of them). When the oldest does not get its pages, all wait."""
        room = self.steps.prefill_rows - len(self._reading())
        for slot in range(self.max_batch):
            if not self._waiting or room == 0:
                return
            if self._slots[slot] is None:
                request = self._waiting[0]
                claimed = self._claim_pages(request)
                if claimed is None:
                    return
                hit, pages = claimed
                self._waiting.popleft()
                self.metrics.observe_queue_time(time.monotonic() - request.arrival)
                request.slot, request.pages, self._slots[slot] = slot, pages, request
                self.steps.reset(slot, pages, request.params.logit_bias, self._suppressed(request.params))
                if hit is not None:
                    self.steps.restore_prefix(slot, hit.snapshot, hit.tokens)
                    request.fed = hit.tokens
                if self.prefix is not None:
                    self.metrics.add_prefix_lookup(request.fed)
                room -= 1

    def _claim_pages(self, request: _Request) -> tuple[CachedPrefix | None, list[int]] | None:
        """The longest cached prefix of `request`'s prompt (None: none, or the prompt is scored)
        and the pages it will hold, that prefix's first (one more reference each); evicts cached
        prefixes, oldest first, when only they keep the pages it needs. None (nothing taken)
        when the pool cannot give them yet."""
        hit = None
        if self.prefix is not None and request.prompt_logprobs is None and request.images is None:
            hit = self.prefix.lookup(request.chain, len(request.prompt))
        shared = [] if hit is None else hit.pages
        need = self.pages_needed(len(request.prompt), request.params.max_tokens) - len(shared)
        self.pages.share(shared)
        if self.prefix is not None:
            self.prefix.make_room(need, keep=hit)
        pages = self.pages.take(need)
        if pages is None:
            self.pages.give(shared)
            return None
        return hit, shared + pages

    def _suppressed(self, params: SamplingParams) -> tuple[int, ...]:
        """The ids that end a request's generation, masked before its min_tokens."""
        eos = self.tokenizer.eos_token_id
        with_eos = not params.ignore_eos and 0 <= eos < self.vocab_size
        return (*params.stop_token_ids, *([eos] if with_eos else []))

    def _fixed_rows(self, slots: list[int]) -> np.ndarray:
        """`slots` padded with other, distinct slots to the prefill_rows rows a step takes."""
        taken = set(slots)
        pad = [s for s in range(self.max_batch) if s not in taken][:self.steps.prefill_rows - len(slots)]
        return np.asarray(slots + pad, np.int32)

    def _piece(self, request: _Request) -> int:
        """The next chunk of a prompt read without padding: prefill_chunk tokens, or the largest
        power of two that fits in what is left."""
        left = len(request.prompt) - request.fed
        return self.chunk if left >= self.chunk else 1 << (left.bit_length() - 1)

    def _prefill_step(self) -> None:
        """One chunk for each of the (up to prefill_rows) oldest slots still reading a prompt;
        without padding, those whose next chunk can be as long as the oldest one's (shorter only
        when that keeps it on a page boundary)."""
        batch = self._reading()
        if not batch:
            return
        if self.aligned:
            c = self._piece(batch[0])
            batch = [r for r in batch
                     if self._piece(r) == c or (self._piece(r) > c and c % self.page_size == 0)]
        try:
            self._prefill(batch)
        except Exception as exc:  # noqa: BLE001 - find the failing request(s), spare the others
            if len(batch) == 1 or not self.steps.cache_alive():
                self._step_failed(batch, exc)
                return
            for request in batch:
                try:
                    self._prefill([request])
                except Exception as exc:  # noqa: BLE001
                    self._step_failed([request], exc)

    def _prefill(self, batch: list[_Request]) -> None:
        """Run one prefill step for `batch` (<= prefill_rows requests in slots); the remaining
        rows of the fixed-size step are other slots, left untouched."""
        rows_n = self.steps.prefill_rows
        if self.aligned:  # every row reads exactly c tokens
            fed = [min(self._piece(r) for r in batch)] * len(batch)
        else:  # the first chunk takes the remainder, the rest are full chunks
            fed = [len(r.prompt) - (len(r.prompt) - 1) // self.chunk * self.chunk if r.fed == 0 else self.chunk
                   for r in batch]
        c = next(b for b in self.buckets if b >= max(fed))  # rows shorter than c are left-padded
        tokens = np.zeros((rows_n, c), np.int32)
        mask = np.zeros((rows_n, c), np.int32)
        scored = any(r.prompt_logprobs is not None for r in batch)
        targets = np.zeros((rows_n, c), np.int32) if scored else None
        for i, (request, n) in enumerate(zip(batch, fed)):
            tokens[i, c - n:] = request.prompt[request.fed:request.fed + n]
            mask[i, c - n:] = 1
            if scored:
                after = request.prompt[request.fed + 1:request.fed + n + 1]  # the next token of each
                targets[i, c - n:c - n + len(after)] = after
        active = np.arange(rows_n) < len(batch)
        sampling = SamplingBatch.of([r.sampling_row() for r in batch] + [SamplingRow()] * (rows_n - len(batch)),
                                    self._allowed([r if r.fed + n == len(r.prompt) else None
                                                   for r, n in zip(batch, fed)], rows_n))
        rows = self._fixed_rows([r.slot for r in batch])
        images = self._chunk_images(batch, fed, c) if any(r.images is not None for r in batch) else None
        sampled, scores = _to_host(self.steps.prefill(rows, tokens, mask, active, sampling, targets, images))
        sampled = jax.tree.map(lambda x: x[None], sampled)  # one step of tokens
        for i, (request, n) in enumerate(zip(batch, fed)):
            if request.prompt_logprobs is not None:
                self._record_prompt_logprobs(request, scores, i, c - n, n)
            request.fed += n
            self._remember(request)
            if request.decoding and request.params.max_tokens == 0:
                self._end_after_prompt(request)
            elif request.decoding:
                self._accept(request, sampled, i, 1)

    def _chunk_images(self, batch: list[_Request], fed: list[int], c: int) -> tuple[jax.Array, np.ndarray]:
        """(embeds `[prefill_rows, c, D]`, is_image bool `[prefill_rows, c]`) of the next chunk of
        each request (its n tokens right-aligned, as in `_prefill`): the image tokens its image
        positions read; a request's images are run through the vision tower at its first chunk."""
        image_id = self.vl_config.vision.image_token_index
        is_image = np.zeros((self.steps.prefill_rows, c), np.bool_)
        rows = []
        for i, (request, n) in enumerate(zip(batch, fed)):
            if request.images is None:
                rows.append(None)
                continue
            if request.features is None:
                request.features = self.steps.image_features(request.images.pixel_values,
                                                             request.images.image_sizes)
                prompt = np.asarray(request.prompt)
                request.feature_index = np.maximum(np.cumsum(prompt == image_id) - 1, 0).astype(np.int32)
            index = np.zeros(c, np.int32)
            index[c - n:] = request.feature_index[request.fed:request.fed + n]
            is_image[i, c - n:] = np.asarray(request.prompt[request.fed:request.fed + n]) == image_id
            rows.append(jnp.take(request.features, index, axis=0))
        zeros = jnp.zeros_like(next(r for r in rows if r is not None))
        rows += [None] * (self.steps.prefill_rows - len(rows))
        return jnp.stack([zeros if r is None else r for r in rows]), is_image

    def _remember(self, request: _Request) -> None:
        """With the prefix cache on, cache the prefix `request` has read when it ends on a page
        boundary (its pages by reference, a snapshot of its slot's state)."""
        if self.prefix is None or request.fed % self.page_size or request.fed == 0 or request.images is not None:
            return
        n = request.fed // self.page_size
        try:
            snapshot = self.prefix.insert(request.chain[n - 1], request.fed, request.pages[:n])
            if snapshot is not None:
                self.steps.save_prefix(request.slot, snapshot)
        except Exception as exc:  # noqa: BLE001 - an empty cache is still correct
            log.error("caching a prompt prefix failed, the prefix cache is emptied: %r", exc)
            self.prefix.clear()

    def _record_prompt_logprobs(self, request: _Request, scores: Sampled, row: int, start: int,
                                n: int) -> None:
        """Append the logprobs of the prompt tokens that follow the `n` chunk positions from
        `start` of row `row` of `scores` (`[R, C]`), the chunk that starts at prompt index fed."""
        k = request.params.prompt_logprobs
        m = min(n, len(request.prompt) - request.fed - 1)
        ids = request.prompt[request.fed + 1:request.fed + 1 + m]
        logprobs = scores.logprob[row, start:start + m].tolist()
        top_ids = scores.top_ids[row, start:start + m, :k].tolist()
        top_logprobs = scores.top_logprobs[row, start:start + m, :k].tolist()
        request.prompt_logprobs += [TokenLogprob(t, lp, list(zip(i, p)))
                                    for t, lp, i, p in zip(ids, logprobs, top_ids, top_logprobs)]

    def _end_after_prompt(self, request: _Request) -> None:
        """A request with max_tokens 0 has read its prompt: its one output, then its end."""
        try:
            request.on_output(Output(request.id, "", [], [], "length", len(request.prompt), 0,
                                     prompt_logprobs=request.prompt_logprobs))
            self._release(request, "length")
        except Exception as exc:  # noqa: BLE001 - fail this request only
            self._fail(request, exc)

    def _decode_step(self) -> None:
        """One decode dispatch for every generating slot: up to decode_steps tokens each, one
        when decode_steps is 1 or a constrained request needs its mask for the next token."""
        rows = [r if r is not None and r.decoding and r.generated else None for r in self._slots]
        running = [r for r in rows if r is not None]
        if not running:
            return
        tokens = np.asarray([r.generated[-1] if r else 0 for r in rows], np.int32)
        writing = np.asarray([r is not None for r in rows])
        sampling = SamplingBatch.of([r.sampling_row() if r else SamplingRow() for r in rows],
                                    self._allowed(rows, len(rows)))
        reading = [r.slot for r in self._reading()]
        protect = np.arange(self.steps.prefill_rows) < len(reading)
        k = self.steps.decode_steps
        try:
            if k == 1 or sampling.allowed is not None:
                one = _to_host(self.steps.decode(tokens, writing, self._fixed_rows(reading), protect, sampling))
                sampled, counts = jax.tree.map(lambda x: x[None], one), writing.astype(np.int32)
            else:
                budget = np.asarray([min(k, r.params.max_tokens - len(r.generated)) if r else 0 for r in rows],
                                    np.int32)
                sampled, counts = _to_host(self.steps.decode_many(tokens, budget, self._fixed_rows(reading),
                                                                  protect, sampling))
        except Exception as exc:  # noqa: BLE001
            self._step_failed(running, exc)
            return
        for request in running:
            self._accept(request, sampled, request.slot, int(counts[request.slot]))

    def _allowed(self, rows: list[_Request | None], n: int) -> np.ndarray | None:
        """The allowed-token mask bool `[n, V]` of a step whose first rows sample for `rows`
        (None: a row that does not sample), or None when no row is constrained."""
        if not any(r is not None and r.mask is not None for r in rows):
            return None
        allowed = np.ones((n, self.vocab_size), np.bool_)
        for i, request in enumerate(rows):
            if request is not None and request.mask is not None:
                allowed[i] = request.mask.allowed()
        return allowed

    def _accept(self, request: _Request, sampled: Sampled, row: int, n: int) -> None:
        """Record the first `n` tokens sampled for `request` (column `row` of `sampled`, whose
        arrays have a leading step axis), in order, up to the one that ends it, and send them as
        one output."""
        try:
            params, first = request.params, not request.generated
            tokens, logprobs, text, finish = [], [], "", None
            for i in range(n):
                token = int(sampled.token[i, row])
                if request.mask is not None:
                    request.mask.accept(token)
                request.generated.append(token)
                tokens.append(token)
                if params.logprobs is not None:
                    k = params.logprobs
                    top = list(zip(sampled.top_ids[i, row, :k].tolist(), sampled.top_logprobs[i, row, :k].tolist()))
                    logprobs.append(TokenLogprob(token, float(sampled.logprob[i, row]), top))
                if token in params.stop_token_ids or (token == self.tokenizer.eos_token_id and not params.ignore_eos):
                    text, finish = text + request.stream.flush(), "stop"
                    break
                delta, hit = request.stream.push(token)
                text += delta
                if hit:
                    finish = "stop"
                    break
                if len(request.generated) >= params.max_tokens:
                    text, finish = text + request.stream.flush(), "length"
                    break
            now = time.monotonic()
            if first:
                self.metrics.observe_ttft(now - request.arrival)
            for _ in range(len(tokens) - first):  # tokens that arrive together share the time since the last
                self.metrics.observe_inter_token((now - request.last_token) / len(tokens))
            request.last_token = now
            self.metrics.add_tokens(len(tokens), now)
            request.on_output(Output(request.id, text, tokens, logprobs, finish, len(request.prompt),
                                     len(request.generated),
                                     prompt_logprobs=request.prompt_logprobs if first else None))
            if finish is not None:
                self._release(request, finish)
        except Exception as exc:  # noqa: BLE001 - fail this request only
            self._fail(request, exc)

    def _step_failed(self, requests: list[_Request], exc: Exception) -> None:
        """A device step raised: fail the requests it served; if it consumed the cache, every
        request in a slot loses its state, so fail those too and start from an empty cache."""
        log.error("engine step failed: %s", "".join(traceback.format_exception(exc)))
        if not self.steps.cache_alive():
            self.steps.rebuild()
            if self.prefix is not None:  # the K/V of the cached prefixes went with the pool
                self.prefix.clear()
            requests = [r for r in self._slots if r is not None]
        for request in requests:
            self._fail(request, exc)

    def _fail(self, request: _Request, exc: Exception) -> None:
        log.error("request %s failed: %r", request.id, exc)
        self._finish(request, "error", f"{type(exc).__name__}: {exc}")

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        """End a request that did not end through `_accept`: tell its client, free its slot."""
        if request.done:
            return
        try:
            request.on_output(Output(request.id, "", [], [], reason, len(request.prompt),
                                     len(request.generated), error))
        except Exception:  # noqa: BLE001 - the client's callback failing must not stop the loop
            log.exception("output callback of %s failed", request.id)
        self._release(request, reason)

    def _release(self, request: _Request, reason: str) -> None:
        """Mark `request` done; free its slot and its K/V pages, or take it off the queue."""
        request.done = True
        if request.slot is not None and self._slots[request.slot] is request:
            self._slots[request.slot] = None
        elif request in self._waiting:
            self._waiting.remove(request)
        self.pages.give(request.pages)
        request.slot, request.pages = None, []
        self.metrics.add_finished(reason, time.monotonic() - request.arrival)


def _to_host(tree):
    """A step's device arrays (any pytree of them) -> numpy, in one transfer."""
    return jax.device_get(tree)


def merge_outputs(parts: list[Output]) -> Output:
    """The outputs of one request, in order, as one `Output` (text and tokens concatenated)."""
    last = parts[-1]
    prompt_logprobs = next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)
    return Output(last.request_id, "".join(p.text for p in parts),
                  [t for p in parts for t in p.token_ids], [lp for p in parts for lp in p.logprobs],
                  last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error,
                  prompt_logprobs)
