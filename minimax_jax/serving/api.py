"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events ending in `data: [DONE]`; chat with tools, tool calls, reasoning and `response_format`),
GET /v1/models, GET /v1/models/{id}, POST /tokenize, POST
/detokenize, GET and HEAD /health, GET /metrics (Prometheus). Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`; a request whose client disconnects is aborted,
which frees its slot.

BOS: a completion prompt, text or token ids alike, is read after a BOS token, which the server
adds when the prompt does not start with one (as training saw documents); an added BOS is
counted in usage.prompt_tokens but is not part of what `echo` returns. So `echo` gives back
exactly the tokens sent (or the text's tokens), the first with a null logprob; the second one's
logprob is conditioned on the BOS (and the first token).

Chat output is read in the model's chat format (`minimax_jax.serving.tools`): MiniMax-M1's
`<think>` reasoning becomes `reasoning_content`, tool calls become `tool_calls` (finish_reason
"tool_calls"); streamed, reasoning and content arrive as they are generated and each tool call
as one delta once it is complete. `tool_choice`: "none" offers no tools (they are not rendered)
and reads no calls; "auto" (the default with tools) lets the model choose; "required" or a
named function forces a call through constrained decoding, as does `response_format`
(json_object / json_schema; with tools under "auto", either the JSON or a call).
`parallel_tool_calls` false keeps one call per answer.

Images (a VL model): user messages may hold `{"type": "image_url", "image_url": {"url": DATA_URL}}`
and `{"type": "image", "image": DATA_URL}` parts, rendered as `<image>` in the prompt and expanded
into each image's image tokens (`serving.images`); only data URLs are read (the server fetches
nothing), and an http URL, a bad or oversized image, or a text model gets a 400 saying why.
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
from minimax_jax.serving.engine import (ContextLengthError, Engine, Output, SamplingParams, TokenLogprob, TokenMask,
                                       merge_outputs)
from minimax_jax.serving.images import IMAGE_PLACEHOLDER, ImageInput, decode_data_url, expand_prompt
from minimax_jax.serving.protocol import (MAX_STOP, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                          DetokenizeRequest, ImagePart, ImageURLPart, NamedToolChoice,
                                          SamplingFields, TokenizeRequest)
from minimax_jax.serving.structured import Grammars, json_value
from minimax_jax.serving.tools import ChatDelta, OutputParser, parse_arguments
from minimax_jax.tokenizer import Tokenizer

MAX_CHOICES = 64  # prompts x n in one request
DISCONNECT_POLL_S = 0.25
ChoiceBuilder = Callable[[int, Output, int, bool], dict | None]
FirstOutput = Callable[[int, Output], Output]
Constraint = Callable[[], TokenMask]  # SamplingParams.constraint


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
        msg = "this server does not support this field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        problems.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
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
        self.grammars = Grammars(tokenizer, engine.vocab_size)
        self.created = int(time.time())

    # ----- turning requests into engine jobs ------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """404 unless `model` (None: not given) is the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {ascii(model)} does not exist; this server serves "
                           f"{self.model_name!r}", "invalid_request_error", "model", "model_not_found")

    def check_request(self, body: SamplingFields) -> None:
        """The checks of a generation request that span fields."""
        self.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def encode(self, text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param)
        return self.tokenizer.encode(text)

    def with_bos(self, ids: list[int]) -> tuple[list[int], int]:
        """(ids as training saw documents: BOS first, unless they already start with it or the
        tokenizer has none; how many ids were added, 0 or 1)."""
        bos = self.tokenizer.bos_token_id
        return (ids, 0) if bos is None or ids[:1] == [bos] else ([bos, *ids], 1)

    def document(self, ids: list[int]) -> tuple[list[int], int]:
        """A completion prompt (token ids) -> `with_bos`; an empty prompt is an error."""
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return self.with_bos(ids)

    def sampling(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                 prompt_len: int, prompt_logprobs: int | None = None,
                 constraint: Constraint | None = None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        for s in stop:
            self.encode(s, "stop")
        if max_tokens is None:  # as many as the context and the K/V pool allow
            max_tokens = self.engine.max_new_tokens(prompt_len)
        seed = None if body.seed is None else body.seed % 2**32
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
            seed=seed, stop=tuple(stop), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, constraint=constraint)

    def jobs(self, prompts: list[list[int]], body: SamplingFields, max_tokens: int | None,
             logprobs: int | None, prompt_logprobs: int | None = None,
             constraint: Constraint | None = None, images: ImageInput | None = None
             ) -> list[tuple[list[int], SamplingParams, ImageInput | None]]:
        """One (prompt ids, params, images) per choice: prompts x n, checked by the engine;
        `constraint` (a `SamplingParams.constraint`) for constrained decoding; `images` (a VL
        model's, of a single prompt) fill its image tokens."""
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be <= {MAX_CHOICES}, got {len(prompts) * body.n}", param="n")
        out = []
        for prompt in prompts:
            params = self.sampling(body, max_tokens, logprobs, len(prompt), prompt_logprobs, constraint)
            try:
                self.engine.check(prompt, params)
                self.engine.check_images(prompt, images)
            except ContextLengthError as e:
                raise APIError(400, str(e), param="prompt", code="context_length_exceeded")
            except ValueError as e:  # the engine's messages start with the setting they name
                field = str(e).split(" ", 1)[0]
                raise APIError(400, str(e), param=field if field in type(body).model_fields else "prompt")
            for i in range(body.n):
                seed = params.seed if params.seed is None else (params.seed + i) % 2**32
                out.append((prompt, dataclasses.replace(params, seed=seed), images))
        return out

    def completion_prompts(self, body: CompletionRequest) -> list[tuple[list[int], int]]:
        """Each prompt of the request as (ids the model reads, BOS ids added in front: 0 or 1)."""
        p = body.prompt
        if isinstance(p, str):
            return [self.document(self.encode(p, "prompt"))]
        if not p:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if isinstance(p[0], str):
            return [self.document(self.encode(s, "prompt")) for s in p]
        if isinstance(p[0], int):
            return [self.document(list(p))]
        return [self.document(list(ids)) for ids in p]

    def chat_messages(self, chat: list[ChatMessage]) -> tuple[list[dict], list]:
        """Request messages -> (the dicts `ChatTemplate.render` takes (an assistant's null content
        is empty; an image part is the placeholder `<image>`), the PIL images of the image parts in
        order); a tool message gets the name of the function whose call (by tool_call_id) it
        answers. 400 names a bad message or image."""
        out, called, images = [], {}, []
        for i, m in enumerate(chat):
            where = f"messages[{i}]"

            def bad(problem: str) -> APIError:
                return APIError(400, f"{where}{problem}", param="messages")

            calls = getattr(m, "tool_calls", None) or []
            parts = [] if isinstance(m.content, str) else m.content or []
            for j, part in enumerate(parts):
                if isinstance(part, (ImageURLPart, ImagePart)):
                    images.append(self.chat_image(part, f"{where}.content[{j}]"))
            text = m.content if isinstance(m.content, str) else "".join(
                IMAGE_PLACEHOLDER if isinstance(part, (ImageURLPart, ImagePart)) else part.text for part in parts)
            message = {"role": m.role, "content": text}
            for j, call in enumerate(calls):
                if parse_arguments(call.function.arguments) is None:
                    raise bad(f".tool_calls[{j}].function.arguments is not a JSON object")
                message.setdefault("tool_calls", []).append(
                    {"id": call.id, "name": call.function.name, "arguments": call.function.arguments})
                called[call.id] = call.function.name
            if m.role == "tool":
                name = called.get(m.tool_call_id)
                if name is None:
                    raise bad(".tool_call_id is not the id of an earlier assistant tool call")
                message.update(name=name, tool_call_id=m.tool_call_id)
            out.append(message)
        return out, images

    def chat_image(self, part: ImageURLPart | ImagePart, where: str):
        """The PIL image of an image part; 400 naming `where` when the model reads no images or
        the data is not a usable image (see `images.decode_data_url`)."""
        if self.engine.vl_config is None:
            raise APIError(400, f"{where} is an image, but the model {self.model_name!r} reads text only",
                           param="messages")
        field = "image_url.url" if isinstance(part, ImageURLPart) else "image"
        try:
            return decode_data_url(part.image_url.url if isinstance(part, ImageURLPart) else part.image)
        except ValueError as e:
            raise APIError(400, f"{where}.{field} {e}", param="messages", code="invalid_image")

    def chat_prompt(self, chat: list[ChatMessage], tools: list[dict] | None = None
                    ) -> tuple[list[int], ImageInput | None]:
        """Chat messages (and the tools offered) -> (the ids of the prompt the chat template
        renders, a VL model's images or None); each image's `<image>` becomes its image tokens."""
        messages, images = self.chat_messages(chat)
        try:
            text = self.chat_template.render(messages, tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages")
        if self.engine.vl_config is None:
            return self.encode(text, "messages"), None
        pieces = [self.encode(piece, "messages") for piece in text.split(IMAGE_PLACEHOLDER)]
        try:
            return expand_prompt(self.engine.vl_config, pieces, images)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_image")

    def chat_tools(self, body: ChatCompletionRequest) -> tuple[list[dict], bool, str | None]:
        """(the tools rendered into the prompt, whether the output is read for tool calls, the
        grammar of constrained decoding or None) of a chat request (see the module docstring)."""
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        functions = {t["function"]["name"]: t["function"] for t in tools}
        if len(functions) != len(tools):
            raise APIError(400, "tools: function names must be distinct", param="tools")
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if choice not in ("none", "auto") and not tools:
            raise APIError(400, "tool_choice required or a named function needs tools", param="tool_choice")
        forced = None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in functions:
                raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not "
                               "among tools", param="tool_choice")
            forced = [functions[choice.function.name]]
        elif choice == "required":
            forced = list(functions.values())
        reads_calls = choice != "none"
        fmt, start, rules = self.chat_template.format, [], ""
        param = "tools"
        rf = body.response_format
        if rf is not None and (rf.type == "json_schema") != (rf.json_schema is not None):
            raise APIError(400, "response_format.json_schema is required with type json_schema, and only "
                           "allowed with it", param="response_format")
        if rf is not None and rf.type != "text":
            if forced is not None:
                raise APIError(400, "response_format cannot be combined with tool_choice required or a "
                               "named function", param="response_format")
            schema = rf.json_schema.schema_ if rf.json_schema is not None else None
            start.append(json_value(schema if schema is not None else {"type": "object"}))
            param = "response_format"
            if reads_calls:
                forced = list(functions.values())
        if forced is not None:
            start.append("calls")
            rules = fmt.call_rules(forced, body.parallel_tool_calls)
        if not start:
            return (tools if reads_calls else []), reads_calls, None
        for name in ("min_tokens", "ignore_eos"):
            if getattr(body, name):
                raise APIError(400, f"{name} cannot be combined with constrained decoding ({param})", param=name)
        grammar = f"start: {' | '.join(start)}\n{rules}"
        try:
            self.grammars.check(grammar)
        except ValueError as e:
            raise APIError(400, f"{param}: the schema cannot be enforced: {e}", param=param)
        return (tools if reads_calls else []), reads_calls, grammar

    # ----- running jobs ---------------------------------------------------------------------------
    async def run_jobs(self, jobs: list[tuple[list[int], SamplingParams, ImageInput | None]],
                       first: FirstOutput | None = None) -> AsyncIterator[tuple[int, Output]]:
        """Submit every job; yield (job index, output) as they come until all have finished, a
        job's first output passed through first(index, output) when given. Closing the iterator
        early (client gone) aborts the jobs still running."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        ids, open_jobs, started = [], set(range(len(jobs))), set()
        try:
            for i, (prompt, params, images) in enumerate(jobs):
                ids.append(self.engine.submit(
                    prompt, params, lambda out, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, out)),
                    images=images))
            while open_jobs:
                i, out = await queue.get()
                if out.finish_reason is not None:
                    open_jobs.discard(i)
                if first is not None and i not in started and finish_error(out) is None:
                    out = first(i, out)
                started.add(i)
                yield i, out
        finally:
            for i in open_jobs:
                if i < len(ids):
                    self.engine.abort(ids[i])

    async def collect(self, request: Request, jobs, first: FirstOutput | None = None) -> list[list[Output]]:
        """All outputs of every job (non-streaming); aborts them if the client disconnects."""
        outputs: list[list[Output]] = [[] for _ in jobs]

        async def consume() -> None:
            async for i, out in self.run_jobs(jobs, first):
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
                      head: dict, chunk_head: dict, choice: ChoiceBuilder, opening: list[dict] = (),
                      first: FirstOutput | None = None):
        """Run `jobs` and answer: one JSON body, or (`body.stream`) server-sent events: `opening`,
        a chunk per output that carries text, logprobs or a finish reason, a usage chunk when
        `stream_options.include_usage`, then `[DONE]`. choice(i, output, text offset, streaming)
        builds one entry of `choices` (None: a streamed output that adds nothing yet); `first`
        rewrites each job's first output (see `run_jobs`)."""
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events() -> AsyncIterator[str]:
                for chunk in opening:
                    yield sse(chunk)
                finals, offsets = [], [0] * len(jobs)
                async for i, out in self.run_jobs(jobs, first):
                    if (err := finish_error(out)) is not None:
                        yield sse(error_body(err.message, err.type))
                        continue
                    if out.finish_reason is not None:
                        finals.append(out)
                    if (out.text or out.logprobs or out.finish_reason) and \
                            (entry := choice(i, out, offsets[i], True)) is not None:
                        yield sse({**chunk_head, "choices": [entry]})
                    offsets[i] += len(out.text)
                if include_usage:
                    yield sse({**chunk_head, "choices": [], "usage": count_usage(prompts, finals)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        merged = [merge_outputs(outs) for outs in await self.collect(request, jobs, first)]
        for out in merged:
            if (err := finish_error(out)) is not None:
                raise err
        return ASCIIJSONResponse({**head, "choices": [choice(i, out, 0, False) for i, out in enumerate(merged)],
                                  "usage": count_usage(prompts, merged)})

    def echo(self, prompt: list[int], added: int, out: Output) -> Output:
        """`out` (a job's first output) with the prompt, less the `added` BOS ids, before its text,
        and the prompt tokens' logprobs (the first one null) before its own when it has them."""
        shown = prompt[added:]
        logprobs = out.logprobs
        if out.prompt_logprobs is not None:
            logprobs = [TokenLogprob(shown[0], None, None), *out.prompt_logprobs[added + 1:], *logprobs]
        return dataclasses.replace(out, text=self.tokenizer.decode(shown) + out.text, logprobs=logprobs)


def finish_error(out: Output) -> APIError | None:
    """The APIError for an output that ended in failure, else None."""
    if out.finish_reason == "error":
        return APIError(500, f"generation failed: {out.error}", "server_error")
    if out.finish_reason == "abort":
        return APIError(503, "generation aborted: the server is shutting down", "server_error")
    return None


def chat_delta(delta: ChatDelta, first_call: int) -> dict:
    """A streamed chat `delta`: the reasoning, content and tool calls (numbered from
    `first_call`) a piece of output added; empty when it added nothing."""
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [c.openai(first_call + k) for k, c in enumerate(delta.tool_calls)]
    return out


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
                "top_logprobs": [None if lp.top is None else {self.token(i): p for i, p in lp.top}
                                 for lp in items],
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
        if 400 <= err.status < 499:  # 499: the client went away
            engine.metrics.add_rejected()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        engine.metrics.add_rejected()
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

    @app.head("/health")
    async def health_head():  # the same answer; the server sends no body for HEAD
        return await health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    model_card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "minimax-jax",
                  "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids, _ = server.chat_prompt(body.messages)
        else:
            ids = server.encode(body.prompt, "prompt")
            ids = server.with_bos(ids)[0] if body.add_special_tokens else ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        if body.tokens and max(body.tokens) >= tokenizer.vocab_size:
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_request(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is only allowed with echo: true", param="max_tokens")
        documents = server.completion_prompts(body)
        prompts = [ids for ids, _ in documents]
        scored = body.logprobs if body.echo else None  # the prompt's logprobs too
        jobs = server.jobs(prompts, body, body.max_tokens, body.logprobs, scored)
        want_logprobs = body.logprobs is not None

        def echo(i: int, out: Output) -> Output:
            return server.echo(*documents[i // body.n], out)

        def choice(i: int, out: Output, offset: int, _: bool) -> dict:
            return {"index": i, "text": out.text, "finish_reason": out.finish_reason,
                    "logprobs": fmt.completion(out.logprobs, offset) if want_logprobs else None}

        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        return await server.respond(request, body, prompts, jobs, head, head, choice,
                                    first=echo if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_request(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tools, reads_calls, grammar = server.chat_tools(body)
        prompt, images = server.chat_prompt(body.messages, tools)
        prompts = [prompt]
        constraint = None if grammar is None else server.grammars.constraint(grammar)
        jobs = server.jobs(prompts, body, body.max_completion_tokens or body.max_tokens, logprobs, None, constraint,
                           images)
        parsers = [server.chat_template.format.parser(reads_calls, body.parallel_tool_calls) for _ in jobs]

        def choice(i: int, out: Output, _: int, stream: bool) -> dict | None:
            parser: OutputParser = parsers[i]
            delta = parser.feed(out.text)
            if out.finish_reason is not None:
                delta = delta + parser.finish()
            finish = "tool_calls" if out.finish_reason == "stop" and parser.calls else out.finish_reason
            lp = fmt.chat(out.logprobs) if logprobs is not None else None
            if stream:
                first_call = parser.calls - len(delta.tool_calls)
                message = chat_delta(delta, first_call)
                if not message and finish is None and not out.logprobs:
                    return None
                return {"index": i, "delta": message, "finish_reason": finish, "logprobs": lp}
            message = {"role": "assistant", "content": delta.content if delta.content or not delta.tool_calls else None}
            if delta.reasoning:
                message["reasoning_content"] = delta.reasoning
            if delta.tool_calls:
                message["tool_calls"] = [c.openai() for c in delta.tool_calls]
            return {"index": i, "message": message, "finish_reason": finish, "logprobs": lp}

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}
        chunk_head = {**head, "object": "chat.completion.chunk"}
        opening = [{**chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]} for i in range(len(jobs))]
        return await server.respond(request, body, prompts, jobs, head, chunk_head, choice, opening)

    return app
