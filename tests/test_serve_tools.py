"""Tool calls in MiniMax-Text-01's format and structured output against the live server, with the
openai client and langchain-openai's `bind_tools`: tools and tool results rendered into the
prompt, the model's (scripted) output parsed into `tool_calls` (also streamed as deltas),
`tool_choice` none / auto / required / a named function, `parallel_tool_calls`, the 400s of bad
tool requests; `response_format` through constrained decoding of the real (random) model: every
sampled answer parses and validates (several seeds, `n` choices each with its own grammar state,
streamed too), `json_object` holds even against a logit_bias pushing elsewhere, a schema that
cannot be enforced is a 400; and the /metrics histograms and rejected count. MiniMax-M1's format:
tests/test_m1.py."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest
from flax import nnx
from scripted import ScriptedOutput

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.serving.tools import TEXT_01_FORMAT, ChatDelta
from minimax_jax.tokenizer import BOS, EOS, ByteTokenizer

MODEL = "tiny-tools"
TOK = ByteTokenizer()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = 'Let me check.<function_call>```typescript\nfunctions.get_weather({"city": "Paris", "unit": "C"})\n```'
TWO_CALLS = CALL + '<function_call>```typescript\nfunctions.get_time({"zone": "CET"})\n```'
ASK_JSON = [{"role": "user", "content": "A person as JSON."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def served():
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))
    with live_server(model, TOK, model_name=MODEL, max_batch=2, max_context=1024,
                     prefill_chunk=64) as s:
        s.script = ScriptedOutput(s.engine, TOK)
        yield s




def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", USER), max_tokens=200,
                                          temperature=0, **kw)


def streamed(client, **kw) -> tuple[str, list[dict], str]:
    """(content, tool calls assembled from the deltas, finish_reason) of a streamed chat."""
    content, calls, finish = "", {}, None
    for chunk in chat(client, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_prompt_renders_tools_calls_and_results():
    messages = [{"role": "system", "content": "S"}, *[{**m} for m in USER],
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "sunny"}]
    text = ChatTemplate().render(messages, [WEATHER])
    assert text == (f"{BOS}system ai_setting=assistant\nS{EOS}\n{BOS}user name=user\nWeather in Paris?{EOS}\n"
                    f'{BOS}ai name=assistant\n<function_call>```typescript\nfunctions.get_weather({{"city": "Paris"}})'
                    f"\n```{EOS}\n"
                    f'{BOS}system function_response=functions\n{{"name": "get_weather", "response": "sunny"}}{EOS}\n'
                    f"{BOS}system function_setting=functions\n{json.dumps(WEATHER['function'])}{EOS}\n"
                    f"{BOS}ai name=assistant\n")


def test_output_parser_streams_content_and_whole_calls():
    parser = TEXT_01_FORMAT.parser(tools=True)
    pieces = [parser.feed(TWO_CALLS[i:i + 5]) for i in range(0, len(TWO_CALLS), 5)]
    assert all("<" not in p.content for p in pieces)  # the marker is held back, never released
    total = sum(pieces, ChatDelta()) + parser.finish()
    assert total.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in total.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    broken = TEXT_01_FORMAT.parser(tools=True)
    assert (broken.feed("a<function_call>oops") + broken.finish()).content == "a<function_call>oops"


def test_auto_tool_call_whole_and_streamed(client, script):
    script.set(CALL)
    r = chat(client, tools=[WEATHER, TIME])
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    content, calls, finish = streamed(client, tools=[WEATHER, TIME])
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"})]


def test_parallel_calls_and_parallel_tool_calls_false(client, script):
    script.set(TWO_CALLS)
    names = [c.function.name for c in chat(client, tools=[WEATHER, TIME]).choices[0].message.tool_calls]
    assert names == ["get_weather", "get_time"]
    one = chat(client, tools=[WEATHER, TIME], parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in one] == ["get_weather"]
    _, calls, _ = streamed(client, tools=[WEATHER, TIME])
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]


def test_tool_choice_none_offers_no_tools_and_reads_no_calls(client, script):
    script.set(CALL)
    r = chat(client, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    plain = chat(client)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools were not rendered


def test_tool_results_are_rendered_back(client, script):
    script.set("It is sunny.")
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = chat(client, messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    internal = [USER[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    assert r.usage.prompt_tokens == len(TOK.encode(ChatTemplate().render(internal, [WEATHER])))


@pytest.mark.parametrize("seed", [1, 2])
def test_required_and_named_tool_choice_force_valid_calls(client, seed):
    """The real (random) model, sampling at temperature 1: every answer is a valid call."""
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=choice,
                                           max_tokens=300, temperature=1.0, seed=seed, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name in names
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema_rs.validate(schema, json.loads(call.function.arguments))


BAD = [
    ("tool_choice", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("tool_choice", {"tool_choice": "required"}),
    ("response_format", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}),
    ("min_tokens", {"tools": [WEATHER], "tool_choice": "required", "min_tokens": 3}),
    ("tools", {"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}}]}),
    ("messages", {"messages": [*USER, {"role": "tool", "tool_call_id": "unknown", "content": "x"}]}),
    ("messages", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}),
]


@pytest.mark.parametrize("field, extra", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_tool_requests_get_a_400_naming_the_field(served, field, extra):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, **extra}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_langchain_bind_tools(served, script):
    langchain_openai = pytest.importorskip("langchain_openai")
    script.set(CALL)
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=served.url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=200, max_retries=0)

    def get_weather(city: str, unit: str) -> str:
        """Weather of a city."""
        return "sunny"

    reply = llm.bind_tools([get_weather]).invoke("Weather in Paris?")
    assert reply.content == "Let me check."
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris", "unit": "C"})]


# ----- response_format ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_answers_always_parse_and_validate(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format=FORMAT, n=3, seed=seed,
                                       temperature=1.0, max_tokens=150)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema_rs.validate(PERSON, json.loads(choice.message.content))


def test_streamed_json_schema_answer_validates(client):
    chunks = client.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format=FORMAT, seed=5,
                                            temperature=1.0, max_tokens=150, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema_rs.validate(PERSON, json.loads(text))


def test_json_object_holds_against_a_bias(client):
    closing = client.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format={"type": "json_object"},
                                             temperature=0, max_tokens=50, logit_bias={str(ord("}")): 100})
    assert closing.choices[0].message.content == "{}"  # "{" had to come first; then "}" ends it
    letters = client.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format={"type": "json_object"},
                                             temperature=0, max_tokens=50, logit_bias={str(ord("a")): 100})
    assert letters.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(letters.choices[0].message.content), dict)  # "a" is allowed only inside strings

@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"type": "object", "properties": {"x": {"$ref": "#/no"}}}])
def test_a_schema_that_cannot_be_enforced_is_a_400(served, schema):
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ASK_JSON, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_metrics_histograms_and_rejected_count_carry_the_model_name(served, client):
    def sample(text: str, name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + "{"))
        assert f'model_name="{MODEL}"' in line
        return float(line.rsplit(" ", 1)[1])

    before = httpx.get(served.url + "/metrics").text
    client.chat.completions.create(model=MODEL, messages=ASK_JSON, max_tokens=4, temperature=0)
    assert httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400
    after = httpx.get(served.url + "/metrics").text
    assert sample(after, "minimax_requests_rejected_total") == sample(before, "minimax_requests_rejected_total") + 1
    for name in ("e2e_request_latency_seconds", "queue_time_seconds", "time_to_first_token_seconds"):
        assert sample(after, f"minimax_{name}_count") == sample(before, f"minimax_{name}_count") + 1
    inter = "minimax_inter_token_latency_seconds_count"
    assert sample(after, inter) == sample(before, inter) + 3  # 4 tokens: 3 gaps
    assert "# TYPE minimax_e2e_request_latency_seconds histogram" in after
