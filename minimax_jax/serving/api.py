"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events ending in `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus). Every
error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; a request whose
client disconnects is aborted, which frees its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.serving.engine import ContextLengthError, Engine, Output, SamplingParams, TokenLogprob, merge_outputs
from minimax_jax.serving.protocol import MAX_STOP, ChatCompletionRequest, CompletionRequest, SamplingFields
from minimax_jax.tokenizer import Tokenizer

MAX_CHOICES = 64  # prompts x n in one request
DISCONNECT_POLL_S = 0.25
ChoiceBuilder = Callable[[int, Output, int, bool], dict]


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so no text (even a lone surrogate) can fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def validation_error(err: RequestValidationError) -> APIError:
    """A 400 naming every invalid field (never echoing the values) or the JSON syntax error."""
    problems, param = [], None
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            problems.append(f"the request body is not valid UTF-8 JSON: {e.get('ctx', {}).get('error', '')}")
            continue
        param = param or (loc[0] if loc else None)
        problems.append(f"{'.'.join(loc)}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
    return APIError(400, "; ".join(problems) or "invalid request", param=param)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> ASCIIJSONResponse:
    return ASCIIJSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class Server:
    """Request handling shared by the routes: validation, tokenization, fan-out to the engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, chat_template: ChatTemplate):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template = chat_template
        self.created = int(time.time())

    # ----- turning requests into engine jobs ------------------------------------------------------
    def check_model(self, body: SamplingFields) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"the model {ascii(body.model)} does not exist; this server serves "
                           f"{self.model_name!r}", "invalid_request_error", "model", "model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param)
        return self.tokenizer.encode(text)

    def document(self, text: str) -> list[int]:
        """A text prompt as training saw documents: BOS first, unless the text already starts
        with it or the tokenizer has none. An empty text is an error."""
        ids = self.encode(text, "prompt")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        bos = self.tokenizer.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]

    def sampling(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                 prompt_len: int) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        for s in stop:
            self.encode(s, "stop")
        if max_tokens is None:  # as many as the context and the K/V pool allow
            max_tokens = self.engine.max_new_tokens(prompt_len)
        seed = None if body.seed is None else body.seed % 2**32
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), seed=seed, stop=tuple(stop), logprobs=logprobs)

    def jobs(self, prompts: list[list[int]], body: SamplingFields, max_tokens: int | None,
             logprobs: int | None) -> list[tuple[list[int], SamplingParams]]:
        """One (prompt ids, params) per choice: prompts x n, checked by the engine."""
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be <= {MAX_CHOICES}, got {len(prompts) * body.n}", param="n")
        out = []
        for prompt in prompts:
            params = self.sampling(body, max_tokens, logprobs, len(prompt))
            try:
                self.engine.check(prompt, params)
            except ContextLengthError as e:
                raise APIError(400, str(e), param="prompt", code="context_length_exceeded")
            except ValueError as e:
                raise APIError(400, str(e), param="prompt")
            for i in range(body.n):
                seed = params.seed if params.seed is None else (params.seed + i) % 2**32
                out.append((prompt, dataclasses.replace(params, seed=seed)))
        return out

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            return [self.document(p)]
        if not p:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if isinstance(p[0], str):
            return [self.document(s) for s in p]
        if isinstance(p[0], int):
            return [list(p)]
        return [list(ids) for ids in p]

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            messages.append((m.role, text))
        try:
            text = self.chat_template.render(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages")
        return self.encode(text, "messages")

    # ----- running jobs ---------------------------------------------------------------------------
    async def run_jobs(self, jobs: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, Output]]:
        """Submit every job; yield (job index, output) as they come until all have finished.
        Closing the iterator early (client gone) aborts the jobs still running."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        ids, open_jobs = [], set(range(len(jobs)))
        try:
            for i, (prompt, params) in enumerate(jobs):
                ids.append(self.engine.submit(
                    prompt, params, lambda out, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, out))))
            while open_jobs:
                i, out = await queue.get()
                if out.finish_reason is not None:
                    open_jobs.discard(i)
                yield i, out
        finally:
            for i in open_jobs:
                if i < len(ids):
                    self.engine.abort(ids[i])

    async def collect(self, request: Request, jobs) -> list[list[Output]]:
        """All outputs of every job (non-streaming); aborts them if the client disconnects."""
        outputs: list[list[Output]] = [[] for _ in jobs]

        async def consume() -> None:
            async for i, out in self.run_jobs(jobs):
                outputs[i].append(out)

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected", "client_closed_request")
        task.result()
        return outputs

    async def respond(self, request: Request, body: SamplingFields, prompts: list[list[int]], jobs,
                      head: dict, chunk_head: dict, choice: ChoiceBuilder, opening: list[dict] = ()):
        """Run `jobs` and answer: one JSON body, or (`body.stream`) server-sent events: `opening`,
        a chunk per output that carries text, logprobs or a finish reason, a usage chunk when
        `stream_options.include_usage`, then `[DONE]`. choice(i, output, text offset, streaming)
        builds one entry of `choices`."""
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                for chunk in opening:
                    yield sse(chunk)
                finals, offsets = [], [0] * len(jobs)
                async for i, out in self.run_jobs(jobs):
                    if (err := finish_error(out)) is not None:
                        yield sse(error_body(err.message, err.type))
                        continue
                    if out.finish_reason is not None:
                        finals.append(out)
                    if out.text or out.logprobs or out.finish_reason:
                        yield sse({**chunk_head, "choices": [choice(i, out, offsets[i], True)]})
                    offsets[i] += len(out.text)
                if include_usage:
                    yield sse({**chunk_head, "choices": [], "usage": count_usage(prompts, finals)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        merged = [merge_outputs(outs) for outs in await self.collect(request, jobs)]
        for out in merged:
            if (err := finish_error(out)) is not None:
                raise err
        return ASCIIJSONResponse({**head, "choices": [choice(i, out, 0, False) for i, out in enumerate(merged)],
                                  "usage": count_usage(prompts, merged)})


def finish_error(out: Output) -> APIError | None:
    """The APIError for an output that ended in failure, else None."""
    if out.finish_reason == "error":
        return APIError(500, f"generation failed: {out.error}", "server_error")
    if out.finish_reason == "abort":
        return APIError(503, "generation aborted: the server is shutting down", "server_error")
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def count_usage(prompts: list[list[int]], finals: list[Output]) -> dict:
    """Usage: prompt tokens once per prompt (not per choice), completion tokens of every choice."""
    return usage(sum(map(len, prompts)), sum(o.completion_tokens for o in finals))


class LogprobFormatter:
    """OpenAI logprobs objects: `completion` (tokens / token_logprobs / top_logprobs / text_offset)
    and `chat` (content: [{token, logprob, bytes, top_logprobs}])."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, items: list[TokenLogprob], offset: int = 0) -> dict:
        tokens = [self.token(lp.token_id) for lp in items]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{self.token(i): p for i, p in lp.top} for lp in items],
                "text_offset": offsets}

    def chat(self, items: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(i, p) for i, p in lp.top]} for lp in items]}


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str,
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started) under the name `model_name`."""
    app = FastAPI(title="minimax-jax", description="OpenAI-compatible MiniMax-01 server")
    server = Server(engine, tokenizer, model_name, chat_template or ChatTemplate())
    fmt = LogprobFormatter(tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        return error_response(validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": server.created, "owned_by": "minimax-jax",
            "max_model_len": engine.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body)
        prompts = server.completion_prompts(body)
        jobs = server.jobs(prompts, body, body.max_tokens, body.logprobs)
        want_logprobs = body.logprobs is not None

        def choice(i: int, out: Output, offset: int, _: bool) -> dict:
            return {"index": i, "text": out.text, "finish_reason": out.finish_reason,
                    "logprobs": fmt.completion(out.logprobs, offset) if want_logprobs else None}

        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        return await server.respond(request, body, prompts, jobs, head, head, choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompts = [server.chat_prompt(body)]
        jobs = server.jobs(prompts, body, body.max_completion_tokens or body.max_tokens, logprobs)

        def choice(i: int, out: Output, _: int, stream: bool) -> dict:
            content = {"content": out.text} if out.text or not stream else {}
            message = {"delta": content} if stream else {"message": {"role": "assistant", **content}}
            return {"index": i, **message, "finish_reason": out.finish_reason,
                    "logprobs": fmt.chat(out.logprobs) if logprobs is not None else None}

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}
        chunk_head = {**head, "object": "chat.completion.chunk"}
        opening = [{**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]} for i in range(len(jobs))]
        return await server.respond(request, body, prompts, jobs, head, chunk_head, choice, opening)

    return app
