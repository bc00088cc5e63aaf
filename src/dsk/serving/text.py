"""Text in and out of the engine: prompt encoding, chat formatting, decoding, stop tokens.

Wraps the model artifact's tokenizer (``dsk.data.tokenizer.Tokenizer`` over its
``tokenizer.json``). Chat messages go through the same ``format_chat`` that finetuning uses,
so the served model sees turns exactly as it was trained on them. Special tokens are control
tokens, never text: generating any of them (``<|end|>`` closing the assistant's turn,
``<|endoftext|>`` closing a document, or the start of another turn) ends the sequence.

    >>> codec = TextCodec.from_artifact(".dsk/artifacts/pretrain/<id>")
    >>> ids = codec.chat_ids([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


CHAT_TOKENS = ("bos", "system", "user", "assistant", "end")


class TextCodec:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special: dict[str, int] = dict(tokenizer.special)
        self.stop_ids = frozenset(self.special.values())

    @classmethod
    def from_artifact(cls, path: str | Path) -> "TextCodec":
        from dsk.data.tokenizer import load_tokenizer

        return cls(load_tokenizer(path))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def completion_ids(self, prompt: str) -> list[int]:
        """A raw-text prompt; an empty one starts a fresh document after the end-of-text token."""
        return self.encode(prompt) or [self.tokenizer.eot_id]

    @property
    def has_chat_tokens(self) -> bool:
        return all(name in self.special for name in CHAT_TOKENS)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for the assistant's reply to ``messages`` (an open assistant turn).

        A tokenizer without the chat tokens (not trained by `dsk featurize`) gets a plain-text
        transcript instead ("User: ...\nAssistant:"), and :attr:`chat_stop` ends the reply
        where the model starts the next turn.
        """
        if self.has_chat_tokens:
            ids, _mask = self.tokenizer.format_chat(messages, add_generation_prompt=True)
            return list(ids)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return self.encode("\n".join(lines) + "\nAssistant:")

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Extra stop strings for chats (only the plain-text transcript needs them)."""
        return () if self.has_chat_tokens else ("\nUser:", "\nSystem:")
