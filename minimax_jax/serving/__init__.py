"""Serving: a continuous-batching engine over fixed slots and an OpenAI-compatible HTTP API.

    python serve.py --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-context 2048]

Routes: POST /v1/completions (with `echo` and `logprobs`, the prompt tokens' logprobs too),
POST /v1/chat/completions (`stream: true` gives server-sent events ending in `data: [DONE]`; tools
and tool calls, MiniMax-M1's reasoning as `reasoning_content`, `response_format`),
GET /v1/models, GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET and HEAD /health,
GET /metrics (Prometheus).

Modules, one job each: `engine` (the background loop: slots, admission, chunked prefill in length
buckets, batched decode several tokens per dispatch, aborts), `pages` (the K/V pages and their
holders), `prefix` (the prefix cache's index), `steps` (the compiled steps over the cache), `sampling` (per-row temperature / top_p / top_k / seed, min_tokens, logit_bias,
penalties, the allowed-token mask, logprobs, prompt scoring), `textstream` (incremental
detokenization, stop strings), `chat` (chat templates), `tools` (the MiniMax chat formats: tool
calls and reasoning, rendered and parsed), `structured` (grammars and their token masks for
constrained decoding), `protocol` (request bodies), `api` (routes, SSE, errors), `metrics`,
`server` (assembly, uvicorn), `cli` (`serve.py`).

Exactness: greedy output does not depend on the other requests in the batch (rows independent,
padding masked) and equals `minimax_jax.generate` for the same prompt (tests/test_serve_engine.py).
The lightning layers keep one float32 state per slot. K/V of the softmax layers live in a pool of
fixed-size pages shared by all slots (`--kv-pages`, `--page-size`); each slot has a page table. A
request is admitted when the pages for its prompt plus max_tokens are free, and returns them when
it ends (finished, aborted or failed); one that could never fit is refused like an over-long one.
With the prefix cache, whole pages of a cached prompt prefix are shared by the requests reading it,
and a snapshot of its lightning states stands in for the part of the prefix no page holds.
"""

from minimax_jax.serving.engine import Engine, Output, SamplingParams

__all__ = ["Engine", "Output", "SamplingParams"]
