"""The engine's fast paths: several decode tokens per dispatch in a loop on the device, and the
prefix cache. Greedy output equals `generate` token for token, alone and with requests joining
mid-generation; stops (EOS, stop ids, stop strings, max_tokens) land inside a dispatch as they
would one token at a time; seeded sampling, penalties and min_tokens equal the one-token path;
a prefix-cache hit (ending mid-page, its pages shared by two running requests) equals recomputing
the prompt."""

from __future__ import annotations

import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_jobs
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate
from minimax_jax.serving.engine import Engine, Output, SamplingParams, merge_outputs
from minimax_jax.tokenizer import ByteTokenizer

STEPS, PAGE, LENGTH, NEW = 4, 8, 29, 16
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 2


class NoEosTokenizer(ByteTokenizer):
    eos_token_id = -1


def prompt(start: int, shared: list[int] | None = None) -> list[int]:
    """LENGTH tokens of TEXT from `start`, after the tokens `shared`."""
    shared = shared or []
    return shared + ByteTokenizer().encode(TEXT[start:start + LENGTH - len(shared)])


SHARED = ByteTokenizer().encode("Shared system prompt")  # 20 tokens: two whole pages and 4 more
PROMPTS = [prompt(0), prompt(7), prompt(19), prompt(40), prompt(3, SHARED), prompt(30, SHARED), prompt(55, SHARED)]


@pytest.fixture(scope="module")
def model() -> MiniMaxForCausalLM:
    return MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    """`generate`'s greedy tokens for every prompt (one batch, one compile)."""
    return np.asarray(generate(model, jnp.asarray(PROMPTS), NEW)).tolist()


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, NoEosTokenizer(), max_batch=4, max_context=64, prefill_chunk=8, prefill_rows=2,
                 page_size=PAGE, decode_steps=STEPS, prefix_cache_slots=16)
    eng.start()
    yield eng
    eng.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def greedy(n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_greedy_equals_generate_alone_and_with_requests_joining_mid_generation(engine, reference):
    tok = ByteTokenizer()
    for i in (0, 1):
        out = engine.generate(PROMPTS[i], greedy())
        assert out.token_ids == reference[i] and out.finish_reason == "length"
    limits = [NEW, 5, 1, 11]
    order: list[int] = []
    parts = run_jobs(engine, [(PROMPTS[0], greedy())], then=(0, 2, [(PROMPTS[i], greedy(limits[i])) for i in (1, 2, 3)]),
                watch=lambda i, out: order.append(i))
    assert [len(o.token_ids) for o in parts[0][:2]] == [1, STEPS]  # the prefill's token, then a dispatch
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # the others joined while it ran
    for i, outs in enumerate(parts):
        out = merge_outputs(outs)
        assert out.token_ids == reference[i][:limits[i]], f"request {i}"
        assert out.completion_tokens == limits[i] and out.finish_reason == "length"
        assert out.text == tok.decode(out.token_ids)  # text streamed in pieces of several tokens


def test_stops_inside_a_dispatch_end_where_one_token_at_a_time_would(engine, reference):
    free = reference[2]
    stop_id = free[5]
    cut = free.index(stop_id)
    out = engine.generate(PROMPTS[2], greedy(stop_token_ids=(stop_id,)))
    assert out.finish_reason == "stop" and out.token_ids == free[:cut + 1]

    eos = NoEosTokenizer()
    eos.eos_token_id = free[6]
    engine.tokenizer = eos
    try:
        out = engine.generate(PROMPTS[2], greedy())
        ignored = engine.generate(PROMPTS[2], greedy(ignore_eos=True))
    finally:
        engine.tokenizer = NoEosTokenizer()
    cut = free.index(free[6])
    assert out.finish_reason == "stop" and out.token_ids == free[:cut + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == free

    text = ByteTokenizer().decode(free)
    stop = text[7:9]
    out = engine.generate(PROMPTS[2], greedy(stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    assert out.token_ids == free[:len(out.token_ids)] and len(out.token_ids) < NEW


def test_seeded_sampling_and_penalties_equal_one_token_per_dispatch(engine):
    jobs = [(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=1.0, seed=7, logprobs=2)),
            (PROMPTS[1], SamplingParams(max_tokens=NEW, temperature=0.8, top_k=5, top_p=0.9, seed=3,
                                        frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2)),
            (PROMPTS[3], SamplingParams(max_tokens=NEW, temperature=1.2, seed=11, min_tokens=9,
                                        stop_token_ids=(101, 32, 116, 104), logit_bias={101: 5.0, 32: 3.0}))]
    many = [merge_outputs(p) for p in run_jobs(engine, jobs)]
    engine.steps.decode_steps = 1  # the same engine, one token per dispatch
    try:
        one = [merge_outputs(p) for p in run_jobs(engine, jobs)]
    finally:
        engine.steps.decode_steps = STEPS
    for a, b in zip(many, one):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert len(many[2].token_ids) >= 9 and many[2].finish_reason == "stop"  # min_tokens held it back
    np.testing.assert_allclose([lp.logprob for lp in many[0].logprobs], [lp.logprob for lp in one[0].logprobs],
                               rtol=1e-5)


def test_a_prefix_cache_hit_ending_mid_page_equals_recomputing(engine, reference):
    x, y = PROMPTS[4:6]  # 20 tokens in common: 2 whole pages of 8, then 4 of the third
    params = greedy(logprobs=5)
    engine.reset_prefix_cache()
    metrics = engine.metrics
    misses = metrics.prefix_misses
    cold_x = engine.generate(x, params)  # caches its first 8, 16 and 24 tokens
    hits, hit_tokens = metrics.prefix_hits, metrics.prefix_hit_tokens
    hot_y = engine.generate(y, params)  # reuses 16 tokens, computes the 13 after them
    hot_x = engine.generate(x, params)  # reuses 24 tokens
    assert metrics.prefix_misses - misses == 1 and metrics.prefix_hits - hits == 2
    assert metrics.prefix_hit_tokens - hit_tokens == 16 + 24
    engine.reset_prefix_cache()
    cold_y = engine.generate(y, params)
    for hot, cold, ref in ((hot_y, cold_y, reference[5]), (hot_x, cold_x, reference[4])):
        assert hot.token_ids == cold.token_ids == ref
        np.testing.assert_allclose([lp.logprob for lp in hot.logprobs], [lp.logprob for lp in cold.logprobs],
                                   atol=1e-5)
        np.testing.assert_allclose([[p for _, p in lp.top] for lp in hot.logprobs],
                                   [[p for _, p in lp.top] for lp in cold.logprobs], atol=1e-5)
    render = metrics.render()
    for name in ("prefix_cache_hits_total", "prefix_cache_misses_total", "prefix_cache_hit_tokens_total",
                 "prefix_cache_entries", "prefix_cache_pages"):
        assert f"minimax_{name}{{" in render


def test_two_running_requests_read_the_same_cached_pages(engine, reference):
    x, y, w = PROMPTS[4:7]
    engine.reset_prefix_cache()
    engine.generate(x, greedy(1))  # caches its first 8, 16 and 24 tokens
    seen: list[tuple[list[list[int]], list[int]]] = []

    def watch(i: int, out: Output) -> None:
        running = [r for r in engine._slots if r is not None and r.prompt in (y, w)]
        if len(running) == 2 and not seen:
            seen.append(([r.pages for r in running], [engine.pages.refs(p) for p in running[0].pages[:3]]))

    parts = run_jobs(engine, [(y, greedy()), (w, greedy())], watch=watch)
    assert [merge_outputs(p).token_ids for p in parts] == reference[5:7]
    (pages_y, pages_w), refs = seen[0]
    assert pages_y[:2] == pages_w[:2] and pages_y[2] != pages_w[2]
    # page 0: x's three entries, y's and w's own 24-token entries, y and w; page 1: one fewer;
    # the first request's own third page: its 24-token entry and itself
    assert refs == [7, 6, 2]
    wait_until(lambda: engine.pages.used == engine.prefix.pages_held)  # y and w gave theirs back
    engine.reset_prefix_cache()
    wait_until(lambda: engine.pages.free == engine.pages.num_pages)
