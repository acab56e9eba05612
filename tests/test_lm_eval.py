"""lm-evaluation-harness against the live server, offline: a local multiple-choice task
(loglikelihood requests: `echo` with `logprobs`) and a local generation task (`generate_until`),
through lm-eval's own `local-completions` client and the Hugging Face tokenizer files a checkpoint
carries. Every loglikelihood lm-eval reports equals the model's own log-softmax summed over the
continuation, and every generation equals the engine's greedy output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from flax import nnx

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.serving.engine import SamplingParams
from minimax_jax.tokenizer import ByteTokenizer

MODEL = "tiny-test"
TOK = ByteTokenizer()
QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a river"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "def add(a, b): return", "choices": [" a + b", " a - b", " None", " b"], "answer": 0},
]
PROMPTS = [{"prompt": "Once upon a time", "target": " there"}, {"prompt": "import numpy as", "target": " np"}]
MAX_GEN = 8


def task_files(directory: Path) -> Path:
    """Write the two tasks (YAML + JSONL) into directory; returns it (lm-eval's include path)."""
    for name, rows in (("mc", QUESTIONS), ("gen", PROMPTS)):
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (directory / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: {MAX_GEN}\n"
        "metric_list:\n  - metric: exact_match\n")
    return directory


@pytest.fixture(scope="module")
def model() -> MiniMaxForCausalLM:
    return MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def served(model):
    with live_server(model, ByteTokenizer(), model_name=MODEL, max_batch=4, max_context=128,
                     prefill_chunk=32) as s:
        yield s


@pytest.fixture(scope="module")
def results(served, tmp_path_factory) -> dict:
    """lm-eval's simple_evaluate over both tasks, with every sample logged."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval")
    (root / "tokenizer").mkdir()
    TOK.save(root / "tokenizer")
    tasks = task_files(root)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    args = (f"model={MODEL},base_url={served.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={root / 'tokenizer'},num_concurrent=2,max_retries=1,max_length=128")
    return lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                   tasks=["tiny_mc", "tiny_gen"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)))


def test_loglikelihoods_equal_the_models_own(results, model):
    """Each (context, continuation) lm-eval scored: the sum of the model's log-softmax over the
    continuation's tokens after BOS + context, and acc the argmax choice's agreement."""
    forward = nnx.jit(lambda m, ids: jax.nn.log_softmax(m(ids)[0], axis=-1))
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for s in samples:
        got = [float(r[0][0]) for r in s["resps"]]
        want = []
        for context, continuation in s["arguments"]:
            ctx, cont = TOK.encode(context), TOK.encode(continuation)
            ids = [TOK.bos_token_id, *ctx, *cont]
            ref = np.asarray(forward(model, jnp.asarray([ids], jnp.int32)))
            pos = np.arange(len(ctx), len(ctx) + len(cont))  # logits at t predict token t + 1
            want.append(float(ref[pos, cont].sum()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        correct += int(np.argmax(want) == s["target"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(samples))


def test_generations_equal_the_engines_greedy_output(results, served):
    """Each generate_until request: the engine's greedy tokens, cut at the task's stop string."""
    samples = results["samples"]["tiny_gen"]
    assert len(samples) == len(PROMPTS)
    for s in samples:
        out = served.engine.generate([TOK.bos_token_id, *TOK.encode(s["arguments"][0][0])],
                                     SamplingParams(max_tokens=MAX_GEN, temperature=0.0))
        assert s["resps"][0][0] == TOK.decode(out.token_ids).split("\n")[0]
