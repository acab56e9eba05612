"""Chat prompts: the checkpoint's own template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) rendered in a Jinja sandbox, else the model's MiniMax chat format
(`minimax_jax.serving.tools`: Text-01's, or MiniMax-M1's for `model_type` minimax_m1). For
Text-01 (spec §11):

    <beginning_of_sentence>system ai_setting=assistant\\n{system}<end_of_sentence>\\n
    <beginning_of_sentence>user name=user\\n{user}<end_of_sentence>\\n
    <beginning_of_sentence>ai name=assistant\\n{assistant}<end_of_sentence>\\n

followed by the generation prompt `<beginning_of_sentence>ai name=assistant\\n`. Generation ends
at the end-of-sentence token. Either way the output is read in the model's chat format (its
reasoning and tool calls).
"""

from __future__ import annotations

import json
from pathlib import Path

from minimax_jax.serving.tools import GENERATION_PROMPT, TEXT_01_FORMAT, ChatFormat
from minimax_jax.tokenizer import BOS, EOS

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


def default_chat_prompt(messages: list[tuple[str, str]]) -> str:
    """(role, text) pairs, roles system | user | assistant -> MiniMax-01 prompt text."""
    return TEXT_01_FORMAT.render([{"role": r, "content": t} for r, t in messages], [])


def load_template_source(directory: str | Path | None) -> str | None:
    """The Jinja chat template shipped with a checkpoint directory, or None."""
    if directory is None:
        return None
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if isinstance(template, str):
            return template
    return None


def openai_message(m: dict) -> dict:
    """A message as HF chat templates read it (OpenAI's shape, call arguments as objects)."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": json.loads(c["arguments"])}}
                             for c in m["tool_calls"]]
    if m["role"] == "tool":
        out.update(name=m["name"], tool_call_id=m.get("tool_call_id"))
    return out


class ChatTemplate:
    """Turns chat messages into prompt text, with the checkpoint's template or the chat
    format's own; `format` is the model's chat format either way."""

    def __init__(self, source: str | None = None, format: ChatFormat = TEXT_01_FORMAT):
        self.source, self.format = source, format
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:  # what HF chat templates call on bad input
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(source)

    @classmethod
    def from_dir(cls, directory: str | Path | None, format: ChatFormat = TEXT_01_FORMAT) -> "ChatTemplate":
        """The template of a checkpoint directory (see `load_template_source`)."""
        return cls(load_template_source(directory), format)

    def render(self, messages: list[dict], tools: list[dict] | None = None, *,
               add_generation_prompt: bool = True) -> str:
        """Messages -> prompt text ending with the assistant's generation prompt (without it when
        `add_generation_prompt` is False: the text of a whole conversation, as training reads it).

        A message is a dict: role (system, developer (= system), user, assistant or tool),
        content (text); an assistant's may hold tool_calls ([{"id", "name", "arguments" (JSON
        text)}]), a tool's the `name` of the function it answers (and its tool_call_id).
        `tools`: OpenAI tool objects offered to the model. ValueError names an unsupported role,
        and carries the message of a checkpoint template that rejects the conversation.
        """
        normalized = []
        for m in messages:
            role = ROLE_ALIASES.get(m["role"], m["role"])
            if role not in ROLES:
                raise ValueError(f"unsupported message role {role!r}; supported: system, developer, "
                                 "user, assistant, tool")
            normalized.append({**m, "role": role})
        if self._template is None:
            prompt = self.format.render(normalized, [t["function"] for t in tools or []])
            # every MiniMax format ends its prompts with the generation prompt
            return prompt if add_generation_prompt else prompt.removesuffix(GENERATION_PROMPT)
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[openai_message(m) for m in normalized], tools=tools or None,
                add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS,
            )
        except TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from e
