"""Fuzz the live server with schemathesis, from the OpenAPI schema FastAPI serves: a bounded
number of generated requests (valid and invalid per the schema) per operation; never a 5xx, every
4xx an OpenAI-style error body, every answer within a time limit, the server healthy after."""

from __future__ import annotations

import collections

import httpx
import pytest
import schemathesis
from flax import nnx
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from conftest import live_server
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.tokenizer import ByteTokenizer

EXAMPLES_PER_OPERATION = 30
RESPONSE_TIMEOUT_S = 60
MODEL = "tiny-test"
CASES: collections.Counter[str] = collections.Counter()
STATUSES: collections.Counter[int] = collections.Counter()
SERVED: collections.Counter[str] = collections.Counter()  # 200s per operation


@pytest.fixture(scope="module")
def live():
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))
    with live_server(model, ByteTokenizer(), model_name=MODEL, max_batch=8, max_context=256,
                     prefill_chunk=16) as served:
        yield served


def operations(url: str) -> list[schemathesis.APIOperation]:
    return [result.ok() for result in schemathesis.openapi.from_url(url + "/openapi.json").get_all_operations()]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(live, mode):
    for operation in operations(live.url):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() in ("GET", "HEAD"):
            continue  # no body, at most a free-form string in the path: nothing can be made invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = MODEL  # reach the engine, not just the unknown-model check
            response = case.call(base_url=live.url, timeout=RESPONSE_TIMEOUT_S)
            CASES[f"{mode.value} {operation.label}"] += 1
            STATUSES[response.status_code] += 1
            SERVED[operation.label] += response.status_code == 200
            assert response.status_code < 500, \
                f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and isinstance(error["type"], str)

        check()


def test_the_server_is_healthy_after_the_fuzz_run(live):
    print(f"schemathesis cases tried: {sum(CASES.values())} {dict(CASES)}; statuses {dict(STATUSES)}")
    assert sum(n for op, n in CASES.items() if "POST" in op) >= 2 * EXAMPLES_PER_OPERATION
    # both generation endpoints reached the engine, and the error paths were exercised
    assert SERVED["POST /v1/completions"] > 0 and SERVED["POST /v1/chat/completions"] > 0, SERVED
    assert sum(n for code, n in STATUSES.items() if 400 <= code < 500) > 10
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
