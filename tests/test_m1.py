"""MiniMax-M1: its HF configs (model_type minimax_m1, MiniMaxM1ForCausalLM, shared_intermediate_size
as a number or a list) load and convert like Text-01's; configs/minimax-m1.yaml; its chat format
(`<begin_of_document>`, the tools turn, `<tool_calls>` lines, tool results); and against the live
server its `<think>` reasoning returned as `reasoning_content` (streamed as it arrives, the tags in
neither field) and its tool calls, scripted and forced."""

from __future__ import annotations

import json

import jax.numpy as jnp
import jsonschema_rs
import numpy as np
import pytest
import yaml
from flax import nnx
from scripted import ScriptedOutput

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.checkpoint import load_model, save_model
from minimax_jax.config import M1, ConfigError
from minimax_jax.convert import hf_to_orbax, orbax_to_hf
from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.serving.tools import M1_FORMAT
from minimax_jax.tokenizer import BOS, EOS, ByteTokenizer

MODEL = "tiny-m1"
TOK = ByteTokenizer()
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}},
                                  "required": ["a"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def tiny_m1() -> MiniMaxConfig:
    return MiniMaxConfig.from_yaml("configs/tiny.yaml", ["model_type=minimax_m1"])


def released(config: dict, shared) -> dict:
    """`config` (ours, written by to_hf_config) as a released M1 config.json spells it."""
    out = {k: v for k, v in config.items() if k not in ("layer_types", "rope_parameters")}
    return {**out, "model_type": "minimax_m1", "architectures": ["MiniMaxM1ForCausalLM"],
            "shared_intermediate_size": shared}


@pytest.mark.parametrize("shared", [0, [0]])
def test_released_configs_read_as_m1(shared):
    cfg = MiniMaxConfig.from_hf_config(released(tiny_m1().to_hf_config(), shared))
    assert cfg.model_type == M1 and cfg.layer_types == tiny_m1().layer_types
    hf = cfg.to_hf_config()
    assert (hf["model_type"], hf["architectures"], hf["shared_intermediate_size"]) == \
        ("minimax_m1", ["MiniMaxM1ForCausalLM"], 0)
    by_name = {**released(hf, shared), "model_type": "whatever"}
    assert MiniMaxConfig.from_hf_config(by_name).model_type == M1
    with pytest.raises(ConfigError, match="shared_intermediate_size"):
        MiniMaxConfig.from_hf_config(released(hf, [0, 64]))


def test_m1_yaml_is_text01_with_its_model_type():
    m1, text01 = (yaml.safe_load(open(f"configs/{n}.yaml"))["model"] for n in ("minimax-m1", "minimax-text-01"))
    assert m1.pop("model_type") == M1 and m1 == text01
    assert MiniMaxConfig.from_yaml("configs/minimax-m1.yaml").model_type == M1


def test_m1_checkpoint_converts_and_loads_like_text01(tmp_path):
    model = MiniMaxForCausalLM(tiny_m1(), rngs=nnx.Rngs(1))
    save_model(model, tmp_path / "ours", tokenizer=TOK)
    hf = orbax_to_hf(tmp_path / "ours", tmp_path / "hf", progress=False)
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MiniMaxM1ForCausalLM"]
    (hf / "config.json").write_text(json.dumps(released(config, 0)))
    back = hf_to_orbax(hf, tmp_path / "back", progress=False)
    ids = jnp.asarray([TOK.encode("M1 reads the same")], jnp.int32)
    expected = np.asarray(model(ids))
    for directory in (hf, back):
        loaded = load_model(directory)
        assert loaded.config.model_type == M1
        np.testing.assert_allclose(np.asarray(loaded(ids)), expected, rtol=1e-5, atol=1e-5)
        assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()


def test_m1_prompt_format():
    messages = [{"role": "system", "content": "S"}, *USER,
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "1", "name": "add", "arguments": '{"a": 2}'},
                                {"id": "2", "name": "add", "arguments": '{"a": 3}'}]},
                {"role": "tool", "name": "add", "content": "4"}, {"role": "tool", "name": "add", "content": "5"}]
    text = ChatTemplate(format=M1_FORMAT).render(messages, [ADD])
    assert text == (
        f"<begin_of_document>{BOS}system ai_setting=assistant\nS{EOS}\n"
        f"{BOS}system tool_setting=tools\nYou are provided with these tools:\n<tools>\n"
        f"{json.dumps(ADD['function'])}\n</tools>\n\nIf you need to call tools, please respond with "
        "<tool_calls></tool_calls> XML tags, and provide tool-name and json-object of arguments, following the "
        'format below:\n<tool_calls>\n{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n'
        f"</tool_calls>{EOS}\n"
        f"{BOS}user name=user\nWhat is 2 + 2?{EOS}\n"
        f'{BOS}ai name=assistant\n<tool_calls>\n{{"name": "add", "arguments": {{"a": 2}}}}\n'
        f'{{"name": "add", "arguments": {{"a": 3}}}}\n</tool_calls>{EOS}\n'
        f"{BOS}tool name=tools\ntool name: add\ntool result: 4\n\ntool name: add\ntool result: 5\n\n{EOS}\n"
        f"{BOS}ai name=assistant\n")


@pytest.fixture(scope="module")
def served():
    with live_server(MiniMaxForCausalLM(tiny_m1(), rngs=nnx.Rngs(0)), TOK, model_name=MODEL,
                     max_batch=2, max_context=1024, prefill_chunk=64) as s:
        s.script = ScriptedOutput(s.engine, TOK)
        yield s




THOUGHT = "<think>\nTwo and two <tool_calls> is not a call here.\n</think>\n\n"


def test_reasoning_is_returned_apart_and_streamed(client, script):
    script.set(THOUGHT + "It is 4.")
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, temperature=0)
    message = r.model_dump()["choices"][0]["message"]
    assert message["content"] == "It is 4." and r.choices[0].finish_reason == "stop"
    assert message["reasoning_content"] == "Two and two <tool_calls> is not a call here.\n"
    deltas = [c.choices[0].delta.model_dump() for c in client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=100, temperature=0, stream=True)]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    content = [d["content"] for d in deltas if d.get("content")]
    assert len(reasoning) > 5  # arrives token by token, not at the end
    assert "".join(reasoning) == message["reasoning_content"] and "".join(content) == "It is 4."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all(not d.get("reasoning_content") for d in deltas[first_content:])
    assert all("think>" not in (d.get("content") or "") + (d.get("reasoning_content") or "") for d in deltas)


def test_m1_tool_calls_after_reasoning(client, script):
    script.set(THOUGHT + 'Adding.<tool_calls>\n{"name": "add", "arguments": {"a": 2}}\n'
                         '{"name": "add", "arguments": {"a": 3}}\n</tool_calls>')
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[ADD], max_tokens=300, temperature=0)
    message = r.model_dump()["choices"][0]["message"]
    assert r.choices[0].finish_reason == "tool_calls" and message["content"] == "Adding."
    assert message["reasoning_content"].startswith("Two and two")
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"a": 2}, {"a": 3}]
    calls = [d for c in client.chat.completions.create(model=MODEL, messages=USER, tools=[ADD], max_tokens=300,
                                                       temperature=0, stream=True)
             for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in calls] == \
        [(0, "add", {"a": 2}), (1, "add", {"a": 3})]


def test_m1_required_tool_call_is_forced(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[ADD], tool_choice="required",
                                       max_tokens=200, temperature=1.0, seed=3)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    for call in r.choices[0].message.tool_calls:
        assert call.function.name == "add"
        jsonschema_rs.validate(ADD["function"]["parameters"], json.loads(call.function.arguments))
