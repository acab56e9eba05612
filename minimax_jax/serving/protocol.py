"""Request bodies of the OpenAI-compatible API (pydantic; FastAPI publishes them as the OpenAPI
schema). No field is silently ignored: every body forbids fields it does not define (a 400 naming
the field), and fields OpenAI defines that this server does not implement (`suffix`,
`audio`, `modalities`, ...) are therefore refused the same way. Validation
is strict (no coercion: "yes" is not a boolean, true is not a token id) and every integer the
engine holds is bounded to int32."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from minimax_jax.serving.sampling import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, TOP_LOGPROBS

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOOLS = 128  # tools per request (OpenAI's limit)
INT32_MAX = 2**31 - 1  # the engine holds token ids, top_k and token counts as int32

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenIdKey = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,9})$")]  # JSON keys are strings
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class StrictModel(BaseModel):
    """A request body part validated without type coercion; an undefined field is an error."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="keep the k most likely tokens; 0 or -1: all")
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="token ids that end generation like EOS")
    ignore_eos: bool = Field(False, description="keep generating past EOS (to max_tokens or a stop)")
    min_tokens: int = Field(0, ge=0, le=INT32_MAX,
                            description="EOS and stop_token_ids cannot be sampled before this many tokens")
    logit_bias: dict[TokenIdKey, Bias] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit before sampling")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="tokens of the prompt or the output: positive logits / p, "
                                          "negative ones * p; 1: off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                    description="subtracted from the logit of every token generated so far")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                     description="times each token's count so far, subtracted from its logit")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    user: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (one per choice set).

    `echo` returns the prompt before the completion; with `logprobs` also the prompt tokens'
    logprobs (the first one null), and `max_tokens` may then be 0 to only score the prompt."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX, description="0 only with echo")
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: 1 or absent")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str = Field(description="a data URL (data:image/png;base64,...); http(s) URLs are not fetched")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted; every image is read whole")


class ImageURLPart(StrictModel):
    """An image (VL models), OpenAI's shape."""

    type: Literal["image_url"]
    image_url: ImageURL


class ImagePart(StrictModel):
    """An image (VL models), as HF chat messages hold one: `image` is a data URL."""

    type: Literal["image"]
    image: str


UserPart = Annotated[TextPart | ImageURLPart | ImagePart, Field(discriminator="type")]


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class CalledFunction(StrictModel):
    name: FunctionName
    arguments: str = Field(description="the arguments as a JSON object (text)")


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


Content = str | list[TextPart]


class SystemMessage(StrictModel):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(StrictModel):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(StrictModel):
    """An answer; with `tool_calls` its content may be null."""

    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(StrictModel):
    """The result of the call `tool_call_id` of an earlier assistant message."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = Field(None, description="forced calls always follow the schema")


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ChosenFunction


class JSONSchema(StrictModel):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="absent: any JSON object")
    strict: bool | None = Field(None, description="the output always follows the schema")


class ResponseFormat(StrictModel):
    """text, json_object (any JSON object) or json_schema (JSON valid against the schema),
    both through constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = Field(None, description="with type json_schema only")


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="false: at most one tool call per answer")


class TokenizeRequest(StrictModel):
    """POST /tokenize: the ids the server reads for a completion `prompt` (BOS first unless
    `add_special_tokens` is false) or a chat's `messages` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(StrictModel):
    """POST /detokenize: token ids -> text."""

    model: str | None = None
    tokens: list[TokenId]
