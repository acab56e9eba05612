"""Chat prompts: the checkpoint's own template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) rendered in a Jinja sandbox, else MiniMax-01's format (spec §11):

    <beginning_of_sentence>system ai_setting=assistant\\n{system}<end_of_sentence>\\n
    <beginning_of_sentence>user name=user\\n{user}<end_of_sentence>\\n
    <beginning_of_sentence>ai name=assistant\\n{assistant}<end_of_sentence>\\n

followed by the generation prompt `<beginning_of_sentence>ai name=assistant\\n`. Generation ends
at the end-of-sentence token.
"""

from __future__ import annotations

import json
from pathlib import Path

from minimax_jax.tokenizer import BOS, EOS

ROLE_LINES = {"system": "system ai_setting=assistant", "user": "user name=user",
              "assistant": "ai name=assistant"}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
GENERATION_PROMPT = f"{BOS}{ROLE_LINES['assistant']}\n"


def default_chat_prompt(messages: list[tuple[str, str]]) -> str:
    """(role, text) pairs, roles system | user | assistant -> MiniMax-01 prompt text."""
    turns = [f"{BOS}{ROLE_LINES[role]}\n{text}{EOS}\n" for role, text in messages]
    return "".join(turns) + GENERATION_PROMPT


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


class ChatTemplate:
    """Turns chat messages into prompt text, with the checkpoint's template or the default."""

    def __init__(self, source: str | None = None):
        self.source = source
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:  # what HF chat templates call on bad input
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(source)

    @classmethod
    def from_dir(cls, directory: str | Path | None) -> "ChatTemplate":
        """The template of a checkpoint directory (see `load_template_source`)."""
        return cls(load_template_source(directory))

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, text) pairs -> prompt text ending with the assistant's generation prompt.

        Roles: system, developer (= system), user, assistant; ValueError names any other, and
        carries the message of a checkpoint template that rejects the conversation.
        """
        normalized = []
        for role, text in messages:
            role = ROLE_ALIASES.get(role, role)
            if role not in ROLE_LINES:
                raise ValueError(f"unsupported message role {role!r}; supported: system, developer, "
                                 "user, assistant")
            normalized.append((role, text))
        if self._template is None:
            return default_chat_prompt(normalized)
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[{"role": r, "content": t} for r, t in normalized], add_generation_prompt=True,
                bos_token=BOS, eos_token=EOS,
            )
        except TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from e
