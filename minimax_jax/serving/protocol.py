"""Request bodies of the OpenAI-compatible API (pydantic; FastAPI publishes them as the OpenAPI
schema). Fields OpenAI defines that this server does not implement are rejected when set to
anything but their neutral value, never silently ignored. Validation is strict (no coercion:
"yes" is not a boolean, true is not a token id) and every integer the engine holds is bounded to
int32."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
INT32_MAX = 2**31 - 1  # the engine holds token ids, top_k and token counts as int32

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class StrictModel(BaseModel):
    """A request body part validated without type coercion."""

    model_config = ConfigDict(strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="keep the k most likely tokens; 0 or -1: all")
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    user: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (one per choice set)."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = Field(False, description="not supported: must be false")
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: 1 or absent")
    suffix: None = Field(None, description="not supported: must be absent")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
