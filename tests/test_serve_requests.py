"""What a request can ask of the live server beyond plain generation: prompt logprobs with `echo`
(equal to the model's own log-softmax), the sampling fields (logit_bias, min_tokens, ignore_eos,
stop_token_ids, repetition / presence / frequency penalties), refusal of every field that is not
implemented, the model / tokenizer / health routes, and prefill length buckets."""

from __future__ import annotations

import concurrent.futures

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.serving import sampling
from minimax_jax.serving.chat import default_chat_prompt
from minimax_jax.serving.engine import SamplingParams, prefill_buckets
from minimax_jax.serving.sampling import (NEG, SamplingBatch, SamplingRow, SlotState, process_logits,
                                          score_positions)
from minimax_jax.tokenizer import ByteTokenizer

MODEL, CONTEXT, CHUNK = "tiny-test", 128, 32
TOK = ByteTokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."


@pytest.fixture(scope="module")
def model() -> MiniMaxForCausalLM:
    return MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def served(model):
    with live_server(model, ByteTokenizer(), model_name=MODEL, max_batch=4, max_context=CONTEXT,
                     prefill_chunk=CHUNK) as s:
        yield s



@pytest.fixture(scope="module")
def log_softmax(model):
    """ids -> float32 log_softmax(model(ids)) `[T, V]`: the full forward pass, no cache."""
    forward = nnx.jit(lambda m, ids: jax.nn.log_softmax(m(ids)[0], axis=-1))
    return lambda ids: np.asarray(forward(model, jnp.asarray([ids], jnp.int32)))


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served.url + path, json={"model": MODEL, **body}, timeout=60)


# ----- prompt logprobs ------------------------------------------------------------------------------
def check_scores(ref: np.ndarray, ids: list[int], token_logprobs: list, top: list[dict | None], k: int) -> None:
    """Entry j >= 1 scores ids[j] after ids[:j] as ref (`[len(ids), V]`) does; entry 0 is null."""
    assert token_logprobs[0] is None and top[0] is None
    np.testing.assert_allclose(token_logprobs[1:], ref[np.arange(len(ids) - 1), ids[1:]], rtol=0, atol=1e-5)
    for j in range(1, len(ids)):
        assert 1 <= len(top[j]) <= k  # distinct ids may decode to one string (bytes of a character)
        expected = np.sort(ref[j - 1])[::-1][:k]
        assert all(np.abs(expected - v).min() < 1e-5 for v in top[j].values())


def test_engine_prompt_logprobs_equal_the_full_forward_pass(served, log_softmax):
    """Several chunks, batched with other prompts (scored and not): the model's own values."""
    prompts = [TOK.encode(TEXT[:60]), TOK.encode(TEXT[:5]), TOK.encode(TEXT[7:40])]
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=4)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        other = pool.submit(served.engine.generate, TOK.encode(TEXT), SamplingParams(max_tokens=4))
        outs = list(pool.map(lambda p: served.engine.generate(p, params), prompts))
        assert other.result().prompt_logprobs is None
    for prompt, out in zip(prompts, outs):
        ref = log_softmax(prompt)
        lps = out.prompt_logprobs
        assert out.finish_reason == "length" and out.token_ids == [] and len(lps) == len(prompt)
        assert [lp.token_id for lp in lps] == prompt and lps[0].logprob is None and lps[0].top is None
        np.testing.assert_allclose([lp.logprob for lp in lps[1:]], ref[np.arange(len(prompt) - 1), prompt[1:]],
                                   rtol=0, atol=1e-5)
        for j, lp in enumerate(lps[1:]):
            ids, values = zip(*lp.top)
            np.testing.assert_allclose(values, ref[j, list(ids)], atol=1e-5)
            np.testing.assert_allclose(values, np.sort(ref[j])[::-1][:4], atol=1e-5)


def test_score_positions_is_exact_over_several_blocks(monkeypatch):
    monkeypatch.setattr(sampling, "SCORE_BLOCK", 8)  # 20 positions: two whole blocks and a padded one
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (2, 20, 16))
    w = jax.random.normal(keys[1], (16, 50))
    targets = jax.random.randint(keys[2], (2, 20), 0, 50)
    out = score_positions(lambda x: x @ w, h, targets)
    ref = jax.nn.log_softmax(h @ w, axis=-1)
    np.testing.assert_allclose(out.logprob, jnp.take_along_axis(ref, targets[..., None], axis=-1)[..., 0],
                               atol=1e-6)
    np.testing.assert_allclose(out.top_logprobs, jax.lax.top_k(ref, 20)[0], atol=1e-6)
    assert out.top_ids.shape == (2, 20, 20) and out.top_ids.dtype == jnp.int32


def test_ordinary_requests_never_score_the_prompt(served):
    steps = served.engine.steps
    real, scored = steps.prefill, []
    steps.prefill = lambda rows, tokens, mask, active, sampling, targets=None, images=None: (
        scored.append(targets is not None), real(rows, tokens, mask, active, sampling, targets, images))[1]
    try:
        served.engine.generate(TOK.encode(TEXT), SamplingParams(max_tokens=3, temperature=0.0, logprobs=5))
        assert scored == [False] * 3
        served.engine.generate(TOK.encode(TEXT), SamplingParams(max_tokens=1, prompt_logprobs=0))
        assert scored[3:] == [True] * 3
    finally:
        del steps.prefill


def test_echo_scores_a_text_prompt_like_lm_eval_asks(served, log_softmax):
    """lm-evaluation-harness: echo, logprobs 1, max_tokens 0 or 1; the BOS the server adds is
    read, not echoed."""
    ids = TOK.encode(TEXT[:30])
    ref = log_softmax([BOS, *ids])[1:]  # the prompt's tokens come after the BOS
    for max_tokens in (0, 1):
        r = post(served, "/v1/completions", {"prompt": TEXT[:30], "echo": True, "logprobs": 1,
                                             "max_tokens": max_tokens, "temperature": 0,
                                             "logit_bias": {str(EOS): -100}}).json()
        choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens and r["usage"]["prompt_tokens"] == len(ids) + 1
        assert lp["tokens"][:len(ids)] == list(TEXT[:30]) and choice["text"].startswith(TEXT[:30])
        assert lp["text_offset"] == list(range(len(ids) + max_tokens))  # one character per token here
        check_scores(ref, ids, lp["token_logprobs"][:len(ids)], lp["top_logprobs"][:len(ids)], 1)
        assert choice["finish_reason"] == "length"
    generated = lp["token_logprobs"][-1]
    assert generated == pytest.approx(max(lp["top_logprobs"][-1].values()))  # greedy


def test_echo_takes_token_ids_and_lists_of_prompts(served, client, log_softmax):
    a, b = TOK.encode(TEXT[:9]), [BOS, *TOK.encode(TEXT[10:50])]  # b brings its own BOS: echoed
    r = client.completions.create(model=MODEL, prompt=[a, b], echo=True, logprobs=3, max_tokens=0, n=2)
    assert [c.text for c in r.choices] == [TOK.decode(a)] * 2 + [TOK.decode(b)] * 2
    assert r.usage.prompt_tokens == len(a) + 1 + len(b) and r.usage.completion_tokens == 0
    for choice, ids, read in zip(r.choices[::2], (a, b), ([BOS, *a], b)):
        assert [TOK.encode(t) for t in choice.logprobs.tokens] == [[i] for i in ids]
        ref = log_softmax(read)[len(read) - len(ids):]
        check_scores(ref, ids, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, 3)
    texts = client.completions.create(model=MODEL, prompt=[TOK.decode(a), TOK.decode(b)], echo=True, logprobs=3,
                                      max_tokens=0)  # the same BOS rule for text
    for text, ids in zip(texts.choices, r.choices[::2]):
        assert text.logprobs.tokens == ids.logprobs.tokens and text.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(text.logprobs.token_logprobs[1:], ids.logprobs.token_logprobs[1:], atol=1e-6)


def test_echo_with_generation_and_streaming(served, client):
    plain = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, temperature=0, logprobs=2)
    echoed = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, temperature=0, logprobs=2,
                                       echo=True)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "Echo me" + plain.choices[0].text
    assert lp.tokens == list("Echo me") + plain.choices[0].logprobs.tokens
    assert lp.text_offset[len("Echo me")] == len("Echo me")
    np.testing.assert_allclose(lp.token_logprobs[len("Echo me"):], plain.choices[0].logprobs.token_logprobs,
                               atol=1e-6)
    stream = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == echoed.choices[0].text
    no_logprobs = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=0, echo=True)
    assert no_logprobs.choices[0].text == "Echo me" and no_logprobs.choices[0].logprobs is None


# ----- sampling fields ------------------------------------------------------------------------------
def test_process_logits_applies_each_setting_as_specified():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0, 1.0]])
    v = logits.shape[1]
    state = SlotState(bias=jnp.zeros((1, v)).at[0, 2].set(1.0), suppress=jnp.zeros((1, v), bool).at[0, 1].set(True),
                      seen=jnp.zeros((1, v), bool).at[0, :2].set(True), counts=jnp.zeros((1, v), jnp.int32).at[0, 3].set(2))
    row = SamplingRow(min_tokens=1, repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    out = process_logits(logits, SamplingBatch.of([row]), state)
    # token 0: seen in the prompt, 2 / 2; token 1: suppressed before min_tokens; token 2: + bias;
    # token 3: generated twice, 3 / 2 - 2 * 0.5 - 0.25; token 4: untouched
    np.testing.assert_allclose(out[0], [1.0, NEG, 1.5, 0.25, 1.0])
    late = process_logits(logits, SamplingBatch.of([row._replace(step=1)]), state)
    assert late[0, 1] == -2.0  # seen in the prompt, negative: * 2


def greedy_reference(log_softmax, prompt: list[int], n: int, rep: float, presence: float,
                     frequency: float) -> list[int]:
    """Greedy decoding by full forward passes with the penalties applied on the host."""
    ids, out = list(prompt), []
    for _ in range(n):
        padded = ids + [0] * (32 - len(ids))  # right padding changes no earlier position: one shape
        logits = log_softmax(padded)[len(ids) - 1].astype(np.float64)  # argmax as of the logits
        counts = np.bincount(out, minlength=logits.shape[0])
        seen = np.isin(np.arange(logits.shape[0]), prompt) | (counts > 0)
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        token = int(np.argmax(logits - frequency * counts - presence * (counts > 0)))
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("rep, presence, frequency", [(1.0, 2.0, 0.0), (1.0, 0.0, 1.5), (1.0, 0.5, 0.5)])
def test_presence_and_frequency_penalties_match_a_reference(served, log_softmax, rep, presence, frequency):
    prompt = [BOS, *TOK.encode("abcabc")]
    plain = served.engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0)).token_ids
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=rep, presence_penalty=presence,
                            frequency_penalty=frequency)
    out = served.engine.generate(prompt, params).token_ids
    assert out == greedy_reference(log_softmax, prompt, 10, rep, presence, frequency) and out != plain


def test_repetition_penalty_covers_the_prompt(served):
    """With a strong repetition penalty, greedy never picks a token of the prompt or its output
    while unseen tokens with positive logits remain."""
    prompt = [BOS, *TOK.encode("abc")]
    plain = served.engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0)).token_ids
    out = served.engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                        repetition_penalty=10.0)).token_ids
    assert len(set(plain)) < len(plain) and out != plain
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


def test_logit_bias_forces_or_bans_a_token(served, client):
    forced = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=1.0, seed=1,
                                       logit_bias={"65": 100})
    assert forced.choices[0].text == "AAAAA"
    prompt, greedy = [BOS, *TOK.encode("x")], SamplingParams(max_tokens=8, temperature=0.0)
    free = served.engine.generate(prompt, greedy).token_ids
    banned = served.engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                           logit_bias={free[0]: -100.0})).token_ids
    assert free[0] not in banned and banned != free


def test_min_tokens_ignore_eos_and_stop_token_ids(served, client):
    eos = {"logit_bias": {str(EOS): 100}}  # the model wants to end at once
    early = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0, extra_body=eos)
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens == 1
    held = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0,
                                     extra_body={**eos, "min_tokens": 4})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 5
    assert held.choices[0].text and TOK.decode([EOS]) not in held.choices[0].text
    ignored = client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=0,
                                        extra_body={**eos, "ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 6

    free = served.engine.generate([BOS, *TOK.encode("y")], SamplingParams(max_tokens=12, temperature=0.0,
                                                                         ignore_eos=True)).token_ids
    stop_id = free[3]
    stopped = client.completions.create(model=MODEL, prompt="y", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    cut = free.index(stop_id)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == cut + 1
    assert stopped.choices[0].text == TOK.decode(free[:cut])  # the stop token is not in the text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, extra_body={"stop_token_ids": [stop_id], "min_tokens": 2,
                                                                     "logit_bias": {str(stop_id): 100}})
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens == 3  # allowed from the third


REFUSED = [
    ("tools", "/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}] * 2}),
    ("tool_choice", "/v1/chat/completions", {"tool_choice": "required"}),
    ("parallel_tool_calls", "/v1/chat/completions", {"parallel_tool_calls": "no"}),
    ("response_format", "/v1/chat/completions", {"response_format": {"type": "json_schema"}}),
    ("stream_options", "/v1/chat/completions", {"stream_options": {"include_usage": True}}),
    ("stream_options", "/v1/completions", {"stream_options": {"include_usage": True}}),
    ("suffix", "/v1/completions", {"suffix": "x"}),
    ("frobnicate", "/v1/completions", {"frobnicate": 1}),
    ("logit_bias", "/v1/completions", {"logit_bias": {"99999": 1}}),
    ("logit_bias", "/v1/completions", {"logit_bias": {"1": 101}}),
    ("stop_token_ids", "/v1/completions", {"stop_token_ids": [300]}),
    ("min_tokens", "/v1/completions", {"min_tokens": 20, "max_tokens": 5}),
    ("max_tokens", "/v1/completions", {"max_tokens": 0}),
    ("messages", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}),
]


@pytest.mark.parametrize("field, path, extra", REFUSED, ids=[f"{f} {p}" for f, p, _ in REFUSED])
def test_fields_not_implemented_get_a_400_naming_them(served, field, path, extra):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = post(served, path, {**body, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["param"] == field, error


def test_neutral_values_are_accepted(served):
    r = post(served, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                              "response_format": {"type": "text"}, "logit_bias": {},
                                              "stop_token_ids": [], "min_tokens": 0, "ignore_eos": False})
    assert r.status_code == 200, r.text


# ----- routes and buckets ---------------------------------------------------------------------------
def test_model_tokenize_detokenize_and_head_health(served, client):
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(served.url + "/v1/models/other-model")
    assert missing.status_code == 404 and "other-model" in missing.json()["error"]["message"]
    head = httpx.head(served.url + "/health")
    assert head.status_code == 200 and head.content == b""

    r = post(served, "/tokenize", {"prompt": "héllo"}).json()
    assert r == {"tokens": [BOS, *TOK.encode("héllo")], "count": 7, "max_model_len": CONTEXT}
    assert post(served, "/tokenize", {"prompt": "hi", "add_special_tokens": False}).json()["tokens"] == [104, 105]
    messages = [{"role": "user", "content": "hi"}]
    chat = post(served, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == TOK.encode(default_chat_prompt([("user", "hi")]))
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert post(served, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": TOK.decode(r["tokens"])}
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": messages}),
                       ("/detokenize", {"tokens": [999]}), ("/tokenize", {"prompt": "a", "model": "nope"})):
        bad = httpx.post(served.url + path, json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["message"], bad.text


def test_prefill_buckets_bound_the_compiled_lengths():
    assert prefill_buckets(256) == (16, 32, 64, 128, 256)
    assert prefill_buckets(100) == (16, 32, 64, 100)
    assert prefill_buckets(16) == (16,) and prefill_buckets(8) == (8,)


def test_a_short_prompt_runs_the_smallest_prefill(served):
    steps = served.engine.steps
    real, lengths = steps.prefill, []
    steps.prefill = lambda rows, tokens, *rest: (lengths.append(tokens.shape[1]), real(rows, tokens, *rest))[1]
    try:
        served.engine.generate([BOS, 1, 2, 3, 4], SamplingParams(max_tokens=2, temperature=0.0))
        assert lengths == [16]
        served.engine.generate([1] * 60, SamplingParams(max_tokens=2, temperature=0.0))  # 28 + 32 tokens
        assert lengths[1:] == [32, 32]
    finally:
        del steps.prefill
