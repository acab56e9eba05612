"""The serving engine without HTTP: exactness against `generate`, batching invariance, chunked
prefill interleaved with decoding, sampling, stop strings, aborts and failure isolation."""

from __future__ import annotations

import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_jobs
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate
from minimax_jax.serving.engine import (ContextLengthError, Engine, Output, SamplingParams,
                                       merge_outputs)
from minimax_jax.serving.sampling import SamplingBatch, SamplingRow, SlotState, sample_rows
from minimax_jax.serving.textstream import TextStream
from minimax_jax.tokenizer import ByteTokenizer

SLOTS, CHUNK, CONTEXT = 32, 16, 160
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> MiniMaxForCausalLM:
    return MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))


class NoEosTokenizer(ByteTokenizer):
    """Greedy outputs of a random model may hit EOS early; here every request runs to max_tokens."""

    eos_token_id = -1


@pytest.fixture(scope="module")
def engine(model):
    # 200 pages of 16 tokens: every test's requests fit together, yet the pool is smaller than
    # 32 slots of full context (352 pages), so pages pass from request to request
    eng = Engine(model, NoEosTokenizer(), max_batch=SLOTS, max_context=CONTEXT, prefill_chunk=CHUNK,
                 prefill_rows=8, page_size=16, kv_pages=200)
    eng.start()
    yield eng
    eng.stop()
    assert not eng.alive


def prompts(n: int) -> list[list[int]]:
    """n prompts of lengths 1..60: one chunk, exactly one chunk, several chunks with a remainder."""
    tok = ByteTokenizer()
    lengths = [1, 5, CHUNK, CHUNK + 1, 37, 60] * (n // 6 + 1)
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
    return [tok.encode((text * 2)[i:i + lengths[i]]) for i in range(n)]


def run_concurrently(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Output]:
    """Submit every job at once, wait for all; their outputs merged per job."""
    return [merge_outputs(p) for p in run_jobs(engine, jobs)]


def wait_for_all_pages(engine: Engine, timeout: float = 10) -> None:
    """Wait until every K/V page is back in the pool, as the allocator and /metrics see it."""
    deadline = time.monotonic() + timeout
    total = engine.pages.num_pages
    while not (engine.pages.free == total and engine.metrics.kv_pages_free == total
               and engine.metrics.kv_pages_used == 0):
        assert time.monotonic() < deadline, f"pages still held: {engine.metrics.render()}"
        time.sleep(0.01)


def test_greedy_output_is_the_same_alone_and_batched_with_31_others(engine):
    batch = prompts(SLOTS)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)  # long enough for all 32 to overlap
    alone = [engine.generate(p, greedy) for p in batch]
    running = []
    original = engine.metrics.set_load
    engine.metrics.set_load = lambda q, r: (running.append(r), original(q, r))
    try:
        together = run_concurrently(engine, [(p, greedy) for p in batch])
    finally:
        del engine.metrics.set_load
    assert max(running) == SLOTS, "the 32 requests never ran together"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.finish_reason in ("length", "stop") and b.finish_reason == a.finish_reason
        assert a.token_ids == b.token_ids, f"request {i} differs alone vs batched"
        assert a.text == b.text
        assert b.completion_tokens == len(b.token_ids) and b.prompt_tokens == len(batch[i])
    wait_for_all_pages(engine)


@pytest.mark.parametrize("length", [CHUNK, 37])  # one exact chunk; a padded chunk + 2 full
def test_greedy_output_equals_generate(engine, model, length):
    prompt = next(p for p in prompts(6) if len(p) == length)
    out = engine.generate(prompt, GREEDY)
    ref = np.asarray(generate(model, jnp.asarray([prompt]), GREEDY.max_tokens))[0].tolist()
    assert out.token_ids == ref and out.finish_reason == "length"


def test_generation_stops_at_eos(engine):
    prompt = prompts(2)[1]
    free = engine.generate(prompt, GREEDY)
    eos_tokenizer = NoEosTokenizer()
    eos_tokenizer.eos_token_id = free.token_ids[2]
    engine.tokenizer = eos_tokenizer
    try:
        out = engine.generate(prompt, GREEDY)
    finally:
        engine.tokenizer = NoEosTokenizer()
    stop = free.token_ids.index(free.token_ids[2])
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:stop + 1]
    assert out.text == eos_tokenizer.decode(free.token_ids[:stop])


def test_a_long_prompt_does_not_stall_decoding(engine):
    events: list[str] = []
    short_started, done = threading.Event(), threading.Event()

    def on_short(out: Output) -> None:
        events.append("short")
        short_started.set()

    def on_long(out: Output) -> None:
        events.append("long")
        if out.finish_reason:
            done.set()

    engine.submit(prompts(1)[0], SamplingParams(max_tokens=8, temperature=0.0), on_short)
    assert short_started.wait(30)
    long_prompt = [65] * (CONTEXT - 2)  # 10 prefill chunks
    engine.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0.0), on_long)
    assert done.wait(60)
    assert events.count("short") == 8 and events.count("long") == 2
    assert events.index("long") > len(events) - 3, f"short decoding waited for the long prefill: {events}"


def test_seeded_sampling_is_reproducible_and_filters_apply(engine):
    prompt = prompts(2)[1]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    a, b = engine.generate(prompt, sampled), engine.generate(prompt, sampled)
    assert a.token_ids == b.token_ids
    other = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=8))
    assert other.token_ids != a.token_ids
    top1 = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3))
    assert top1.token_ids == engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0)).token_ids


def test_sample_rows_keeps_each_rows_top_k_and_top_p():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    sample = jax.jit(lambda logits, batch: sample_rows(logits, batch, SlotState.empty(4, 50)))
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for seed in range(20):
        tokens = np.asarray(sample(logits, SamplingBatch.of([SamplingRow(seed, r, 1.0, 1.0, 3) for r in range(4)])).token)
        assert all(tokens[r] in top3[r] for r in range(4))
    out = sample(logits, SamplingBatch.of([SamplingRow(s, 0, 1.0, 1e-6, 0, top_logprobs=2) for s in range(4)]))
    np.testing.assert_array_equal(out.token, np.argmax(logits, axis=-1))
    np.testing.assert_allclose(out.logprob, np.max(jax.nn.log_softmax(logits), axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids[:, 0], out.token)
    # no row asks for alternatives: the vocabulary-wide top_k is skipped
    unasked = sample(logits, SamplingBatch.of([SamplingRow(s, 0, 1.0, 1e-6, 0) for s in range(4)]))
    np.testing.assert_array_equal(unasked.token, out.token)
    assert not np.any(unasked.top_ids) and not np.any(unasked.top_logprobs)


def test_logprobs_are_reported_when_asked(engine):
    out = engine.generate(prompts(1)[0], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))
    assert len(out.logprobs) == 4
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token_id == token and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0] == (token, pytest.approx(lp.logprob))  # greedy picks the most likely
    assert engine.generate(prompts(1)[0], GREEDY).logprobs == []


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=("o w", "zz"))
    released = [stream.push(b) for b in "hello".encode()]
    assert "".join(d for d, _ in released) == "hell"  # "o" may start "o w"
    assert stream.push(ord(" ")) == ("", False)
    assert stream.push(ord("w")) == ("", True)
    assert stream.text == "hell"

    stream = TextStream(tok, stop=("zz",))
    e_acute = "é".encode()
    assert stream.push(e_acute[0]) == ("", False)
    assert stream.push(e_acute[1]) == ("é", False)
    assert stream.push(ord("z")) == ("", False)
    assert stream.flush() == "z"


def test_stop_string_ends_generation(engine):
    prompt = prompts(2)[1]
    free = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0))
    stop = free.text[3:5]
    cut = free.text.index(stop)
    out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == free.text[:cut]


def test_abort_frees_the_slot(engine):
    outputs: list[Output] = []
    first = threading.Event()
    rid = engine.submit(prompts(1)[0], SamplingParams(max_tokens=100, temperature=0.0),
                        lambda o: (outputs.append(o), first.set()))
    assert first.wait(30)
    engine.abort(rid)
    deadline = time.monotonic() + 120  # a liveness bound, generous for a loaded machine
    while not (outputs[-1].finish_reason and engine.metrics.running_slots == 0):
        assert time.monotonic() < deadline, "the aborted request kept its slot"
        time.sleep(0.01)
    assert outputs[-1].finish_reason == "abort" and len(outputs) < 100
    wait_for_all_pages(engine)


def test_a_failing_request_does_not_affect_the_others(engine):
    batch = prompts(6)
    reference = [engine.generate(p, GREEDY) for p in batch]
    poison = [7, 7, 7, 7]
    real_prefill = engine.steps.prefill

    def faulty_prefill(rows, tokens, mask, active, *rest):
        if any(list(row[-4:]) == poison for row in tokens[active]):
            raise RuntimeError("injected prefill failure")
        return real_prefill(rows, tokens, mask, active, *rest)

    def broken_callback(out: Output) -> None:
        raise RuntimeError("injected client failure")

    engine.steps.prefill = faulty_prefill
    try:
        engine.submit(batch[0], GREEDY, broken_callback)
        results = run_concurrently(engine, [(p, GREEDY) for p in batch] + [([1, 2] + poison, GREEDY)])
    finally:
        del engine.steps.prefill
    assert results[-1].finish_reason == "error" and "injected prefill failure" in results[-1].error
    assert [r.token_ids for r in results[:-1]] == [r.token_ids for r in reference]
    assert engine.alive and engine.generate(batch[1], GREEDY).token_ids == reference[1].token_ids


@pytest.mark.parametrize("prompt, params, message", [
    ([], GREEDY, "the prompt is empty"),
    ([1] * (CONTEXT - 5), GREEDY, "maximum context length is 160"),
    ([1, 300], GREEDY, "token ids must be in [0, 264)"),
    ([1], SamplingParams(max_tokens=-1), "max_tokens must be >= 0"),
    ([1], SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
    ([1], SamplingParams(logprobs=21), "logprobs must be in [0, 20]"),
])
def test_invalid_requests_are_rejected_with_a_reason(engine, prompt, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.submit(prompt, params, lambda out: None)


def test_the_engine_survives_an_unexpected_error_in_its_loop(engine):
    real_reset = engine.steps.reset

    def failing_reset(slot: int, pages: list[int], *rest) -> None:
        del engine.steps.reset  # fail once
        raise RuntimeError("injected reset failure")

    engine.steps.reset = failing_reset
    try:
        out = engine.generate(prompts(1)[0], GREEDY, timeout=30)
    finally:
        engine.steps.__dict__.pop("reset", None)
    assert out.finish_reason == "error" and "injected reset failure" in out.error
    assert engine.steps.reset == real_reset and engine.alive
    assert engine.generate(prompts(1)[0], GREEDY).finish_reason == "length"


def test_a_request_waits_for_pages_then_completes(model):
    """A pool of 6 pages of 16 tokens: A (20 + 40 tokens: 5 pages) runs, B (5 + 20: 3 pages)
    waits in the queue until A is done, then completes; a request that needs more pages than
    the whole pool is refused at once. Outputs equal `generate`; all pages come back."""
    engine = Engine(model, NoEosTokenizer(), max_batch=4, max_context=CONTEXT, prefill_chunk=CHUNK,
                    prefill_rows=2, page_size=16, kv_pages=6)
    jobs = {"A": (prompts(6)[5][:20], SamplingParams(max_tokens=40, temperature=0.0)),
            "B": (prompts(2)[1], SamplingParams(max_tokens=20, temperature=0.0))}
    assert engine.pages_needed(20, 40) == 5 and engine.pages_needed(5, 20) == 3
    with pytest.raises(ContextLengthError, match=re.escape(
            "needs 8 K/V pages of 16 tokens for 60 prompt tokens + max_tokens 60; "
            "the K/V pool holds 6")):
        engine.check([1] * 60, SamplingParams(max_tokens=60))
    assert engine.max_new_tokens(60) == 6 * 16 - 64 + 1  # what the pool allows, below max_context
    engine.check([1] * 60, SamplingParams(max_tokens=engine.max_new_tokens(60)))

    events: list[tuple[str, Output]] = []
    finished = threading.Semaphore(0)
    used: list[int] = []
    original = engine.metrics.set_kv_pages
    engine.metrics.set_kv_pages = lambda u, f: (used.append(u), original(u, f))
    engine.start()
    try:
        for name, (prompt, params) in jobs.items():
            engine.submit(prompt, params, lambda out, name=name: (
                events.append((name, out)), out.finish_reason and finished.release()))
        assert finished.acquire(timeout=120) and finished.acquire(timeout=120)
        wait_for_all_pages(engine)
    finally:
        engine.stop()
    assert [name for name, _ in events] == ["A"] * 40 + ["B"] * 20, "B ran while A held the pages"
    assert 5 in used and max(used) == 5, used
    for name, (prompt, params) in jobs.items():
        out = merge_outputs([o for n, o in events if n == name])
        ref = np.asarray(generate(model, jnp.asarray([prompt]), params.max_tokens))[0].tolist()
        assert out.finish_reason == "length" and out.token_ids == ref, f"{name} != generate"
