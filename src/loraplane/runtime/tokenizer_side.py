"""TokenizerSide: the HTTP side's half of RuntimeAPI, wherever the engine runs.

Prompts become token ids and token ids become text where the HTTP requests are, never on the
engine's thread: the in-process Runtime and the RemoteRuntime (engine in its own process)
both have from here the tokenizer's answers and submit, which opens a request's Streams and
hands it to the engine through their two hooks, submit_ids and release.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from loraplane.runtime.detokenizer import Detokenizer
from loraplane.runtime.outputs import RequestStream, Streams
from loraplane.runtime.sampling import SamplingParams


class TokenizerSide(ABC):
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.streams = Streams(Detokenizer(tokenizer))
        self._special_ids = set(tokenizer.all_special_ids)

    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> list[RequestStream]:
        return self.streams.submit(
            prompts,
            params,
            lambda seq_ids: self.submit_ids(prompts, params, adapter, seq_ids),
            self.release,
            loop,
        )

    @abstractmethod
    def submit_ids(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        adapter: str | None,
        seq_ids: list[int],
    ) -> None:
        """Hand the engine a request whose streams are open (Engine.submit's refusals)."""

    @abstractmethod
    def release(self, seq_id: int, reason: str) -> None:
        """Tell the engine a sequence is over: "stop" (its stop string) or "abort"."""

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
