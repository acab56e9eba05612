"""Putting a server together: model + tokenizer + engine + app, and running uvicorn (blocking,
or on a background thread for tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from minimax_jax.cache import PAGE_SIZE
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.api import create_app
from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.serving.engine import Engine, SamplingParams
from minimax_jax.serving.metrics import Metrics
from minimax_jax.serving.tools import chat_format
from minimax_jax.tokenizer import Tokenizer
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration, text_model


@dataclasses.dataclass
class Served:
    """A started engine and the app serving it; `close()` stops the engine."""

    engine: Engine
    app: FastAPI

    def close(self) -> None:
        self.engine.stop()


def build(model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration, tokenizer: Tokenizer, *, model_name: str,
          checkpoint_dir: str | Path | None = None, max_batch: int = 8, max_context: int = 2048,
          prefill_chunk: int = 256, prefill_rows: int = 4, page_size: int = PAGE_SIZE,
          kv_pages: int | None = None, decode_steps: int = 1, prefix_cache_slots: int = 0) -> Served:
    """Engine (started and warmed up: reset, decode and the prefill of every length bucket
    compiled; the prefill that also scores a prompt compiles on the first `echo` with logprobs,
    the steps of constrained decoding on the first constrained request) + app; see `Engine` for
    the sizes, `decode_steps` and `prefix_cache_slots`. The chat template comes from
    `checkpoint_dir`'s tokenizer files when it has one, else the model's MiniMax chat format
    (Text-01's, or MiniMax-M1's for its `model_type`), in which the output is read either way.
    Metrics are labelled with `model_name`."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_context=max_context,
                    prefill_chunk=prefill_chunk, prefill_rows=prefill_rows, page_size=page_size,
                    kv_pages=kv_pages, metrics=Metrics(model_name=model_name), decode_steps=decode_steps,
                    prefix_cache_slots=prefix_cache_slots)
    engine.start()
    engine.generate([0], SamplingParams(max_tokens=2, temperature=0.0))  # the smallest bucket, decode
    for length in engine.buckets[1:]:
        if length < max_context and engine.pages_needed(length, 1) <= engine.pages.num_pages:
            engine.reset_prefix_cache()  # read every warm-up prompt whole, in one chunk
            engine.generate([0] * length, SamplingParams(max_tokens=1, temperature=0.0))
    engine.reset_prefix_cache()
    app = create_app(engine, tokenizer, model_name=model_name,
                     chat_template=ChatTemplate.from_dir(checkpoint_dir,
                                                         chat_format(text_model(model).config.model_type)))
    return Served(engine, app)


class BackgroundServer:
    """uvicorn serving `app` on a daemon thread; `port` 0 picks a free one (see `.port`)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {host}:{port}")
            time.sleep(0.02)
        self.host = host
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
