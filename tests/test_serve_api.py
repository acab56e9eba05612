"""A live server on loopback driven by the official `openai` client (and raw httpx for what the
client cannot send): completions, chat, streaming, 32 concurrent requests, bad inputs, one
request failing among others, client disconnects, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from flax import nnx

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.serving.chat import ChatTemplate, default_chat_prompt
from minimax_jax.serving.engine import SamplingParams
from minimax_jax.tokenizer import ByteTokenizer

MODEL, CONTEXT = "tiny-test", 128


class NoEosTokenizer(ByteTokenizer):
    """Greedy outputs of a random model may hit EOS early; here every request runs to max_tokens."""

    eos_token_id = -1


@pytest.fixture(scope="module")
def served():
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))
    with live_server(model, NoEosTokenizer(), model_name=MODEL, max_batch=8, max_context=CONTEXT,
                     prefill_chunk=16) as s:
        yield s



def greedy_text(served, prompt: list[int], max_tokens: int) -> str:
    return served.engine.generate(prompt, SamplingParams(max_tokens, 0.0)).text


def document(text: str) -> list[int]:
    """How the server tokenizes a text prompt: BOS, then the text."""
    tok = ByteTokenizer()
    return [tok.bos_token_id, *tok.encode(text)]


def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(served.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("minimax_queue_depth", "minimax_running_slots", "minimax_generation_tokens_per_second",
                 "minimax_time_to_first_token_seconds_bucket", "minimax_generation_tokens_total",
                 "minimax_kv_pages_used", "minimax_kv_pages_free"):
        assert f"\n{name}" in metrics.text


def test_completion_is_the_engines_greedy_output(served, client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                  logprobs=2)
    choice = r.choices[0]
    assert choice.text == greedy_text(served, document("Once upon a time"), 12)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 1 + len("Once upon a time") and r.usage.completion_tokens == 12
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 and v <= 0 for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_completion_accepts_token_ids_and_several_prompts(served, client):
    ids = ByteTokenizer().encode("abc")
    r = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0, n=2)
    assert len(r.choices) == 4 and len({c.text for c in r.choices}) == 1
    assert r.choices[0].text == greedy_text(served, [ByteTokenizer.bos_token_id, *ids], 5)  # BOS as for text
    assert r.usage.prompt_tokens == 2 * 4
    with_bos = client.completions.create(model=MODEL, prompt=[ByteTokenizer.bos_token_id, *ids], max_tokens=5,
                                         temperature=0)
    assert with_bos.choices[0].text == r.choices[0].text and with_bos.usage.prompt_tokens == 4


def test_chat_uses_the_template_and_accepts_typed_parts(served, client):
    messages = [("system", "Be brief."), ("user", "Hello there")]
    expected = greedy_text(served, ByteTokenizer().encode(default_chat_prompt(messages)), 10)
    plain = client.chat.completions.create(
        model=MODEL, max_tokens=10, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    typed = client.chat.completions.create(
        model=MODEL, max_completion_tokens=10, temperature=0,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    for r in (plain, typed):
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected
        assert r.usage.prompt_tokens == len(ByteTokenizer().encode(default_chat_prompt(messages)))


def test_default_chat_format_and_checkpoint_templates(tmp_path):
    text = default_chat_prompt([("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")])
    assert text == ("<beginning_of_sentence>system ai_setting=assistant\nS<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\nU<end_of_sentence>\n"
                    "<beginning_of_sentence>ai name=assistant\nA<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\nV<end_of_sentence>\n"
                    "<beginning_of_sentence>ai name=assistant\n")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "developer", "content": "S"},
                                                   {"role": "user", "content": "U"}]) == \
        default_chat_prompt([("system", "S"), ("user", "U")])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template":
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"}))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hi"}]) == "[user]hi>"
    with pytest.raises(ValueError, match="unsupported message role 'robot'"):
        ChatTemplate().render([{"role": "robot", "content": "x"}])
    strict = ChatTemplate("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(ValueError, match="system first"):
        strict.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="the chat template failed"):
        ChatTemplate("{{ messages[0].nope.deeper }}").render([{"role": "user", "content": "x"}])


def test_streaming_equals_the_whole_answer_and_reports_usage(served, client):
    whole = client.completions.create(model=MODEL, prompt="Stream me", max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Stream me", max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks)

    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**chat, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_32_concurrent_requests_match_their_solo_answers(served, client):
    prompts = [f"Request {i}: " + "xyz" * (i % 7) for i in range(32)]
    solo = [greedy_text(served, document(p), 8) for p in prompts]

    def ask(i: int) -> str:
        if i % 2:
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in stream if c.choices)
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32), timeout=120))
    assert answers == solo


BAD_REQUESTS = [
    ("invalid JSON", "/v1/completions", b'{"model": "tiny-test", "prompt": ', 400),
    ("invalid UTF-8", "/v1/completions", b'{"model": "tiny-test", "prompt": "\xff\xfe"}', 400),
    ("lone surrogate", "/v1/completions", b'{"model": "tiny-test", "prompt": "\\ud800"}', 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    ("max_tokens 0", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400),
    ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": "x" * (CONTEXT + 1)}, 400),
    ("prompt + max_tokens over the context", "/v1/completions",
     {"model": MODEL, "prompt": "x" * 100, "max_tokens": CONTEXT}, 400),
    ("wrong prompt type", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400),
    ("wrong temperature type", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("image part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("absurd n", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 10**9}, 400),
    ("token id out of vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400),
    ("empty prompt list", "/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("too many stop strings", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, 400),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    ("penalty out of range", "/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400),
    ("top_k past int32", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 2**31}, 400),
    ("top_k 2**63", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 2**63}, 400),
    ("max_tokens past int32", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2**40}, 400),
    ("token id past int32", "/v1/completions", {"model": MODEL, "prompt": [1, 2**32 + 1]}, 400),
    ("stream as a string", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
    ("booleans as token ids", "/v1/completions", {"model": MODEL, "prompt": [True, False]}, 400),
    ("max_tokens as a float", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4.0}, 400),
    ("no such route", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404),
]


@pytest.mark.parametrize("name, path, body, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_inputs_get_an_openai_style_4xx(served, name, path, body, status):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(served.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert httpx.get(served.url + "/health").status_code == 200


def test_the_openai_client_sees_4xx_as_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128") as info:
        client.completions.create(model=MODEL, prompt="x" * 200, max_tokens=4)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_server_side_failure_in_one_request_spares_the_others(served, client):
    steps = served.engine.steps
    real_prefill = steps.prefill

    def faulty_prefill(rows, tokens, mask, active, *rest):
        if any(bytes(row[-4:].tolist()) == b"BOOM" for row in tokens[active]):
            raise RuntimeError("injected failure")
        return real_prefill(rows, tokens, mask, active, *rest)

    prompts = ["fine one", "fine two", "BOOM", "fine three"]
    expected = [greedy_text(served, document(p), 6) for p in prompts if p != "BOOM"]
    steps.prefill = faulty_prefill
    try:
        def ask(p: str):
            try:
                return client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
            except openai.InternalServerError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, prompts, timeout=60))
        with httpx.stream("POST", served.url + "/v1/completions", json={
                "model": MODEL, "prompt": "BOOM", "max_tokens": 4, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
    finally:
        del steps.prefill
    failed = answers.pop(2)
    assert isinstance(failed, openai.InternalServerError) and "injected failure" in str(failed)
    assert answers == expected
    assert "injected failure" in json.loads(events[0][len("data: "):])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert httpx.get(served.url + "/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=3).choices[0].text is not None


def test_a_client_that_disconnects_frees_its_slot_and_pages(served):
    metrics, steps = served.engine.metrics, served.engine.steps
    aborts, tokens = metrics.finished["abort"], metrics.generation_tokens
    body = {"model": MODEL, "prompt": "long answer", "max_tokens": CONTEXT - 20, "temperature": 0}
    real_decode = steps.decode
    steps.decode = lambda *args: (time.sleep(0.02), real_decode(*args))[1]  # >= 2 s per answer
    try:
        with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: give up while it is generating
            httpx.post(served.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 120  # a liveness bound, generous for a loaded machine
        pool = served.engine.pages.num_pages
        while (metrics.running_slots or metrics.finished["abort"] < aborts + 2
               or metrics.kv_pages_used or metrics.kv_pages_free != pool):
            assert time.monotonic() < deadline, f"slots still busy: {metrics.render()}"
            time.sleep(0.05)
    finally:
        del steps.decode
    assert metrics.generation_tokens - tokens < 2 * body["max_tokens"]
    assert httpx.get(served.url + "/health").status_code == 200
