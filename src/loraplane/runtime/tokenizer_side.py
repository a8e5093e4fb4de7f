"""TokenizerSide: what the HTTP side answers from the tokenizer alone, wherever the engine runs.

Prompts become token ids and token ids become text where the HTTP requests are, never on the
engine's thread: the in-process Runtime and the RemoteRuntime (engine in its own process)
both have this half of RuntimeAPI from here, with the Streams that make the output text.
"""

from __future__ import annotations

from typing import Any

from loraplane.runtime.detokenizer import Detokenizer
from loraplane.runtime.outputs import Streams


class TokenizerSide:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.streams = Streams(Detokenizer(tokenizer))
        self._special_ids = set(tokenizer.all_special_ids)

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids
