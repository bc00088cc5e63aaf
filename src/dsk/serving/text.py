"""Text in and out of the engine: prompt encoding, chat formatting, decoding, stop tokens.

Wraps the model artifact's tokenizer (a Hugging Face ``tokenizers.Tokenizer`` from
``tokenizer.json``). Chat messages are rendered with the project's chat template
(``dsk.data.tokenizer.format_chat``) so that serving formats turns exactly like finetuning did.

    >>> codec = TextCodec(tokenizer)
    >>> ids = codec.chat_ids([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

from typing import Any

from dsk.errors import DskError

# special tokens that end a generation: the end of a document or of the assistant's turn, or
# the start of another turn (a model that skips the end-of-turn token still stops there)
STOP_TOKEN_NAMES = ("eot", "eos", "end", "user", "system")


class TextCodec:
    def __init__(self, tokenizer: Any):
        if tokenizer is None:
            raise DskError("the model artifact has no tokenizer.json; serve a pretrain/finetune artifact")
        self.tokenizer = tokenizer
        self.special = special_tokens(tokenizer)
        self.stop_ids = frozenset(i for name, i in self.special.items() if name in STOP_TOKEN_NAMES)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def completion_ids(self, prompt: str) -> list[int]:
        """A raw-text prompt; an empty one starts a fresh document after the end-of-text token."""
        ids = self.encode(prompt)
        if not ids:
            first = self.special.get("eot", self.special.get("bos"))
            ids = [first] if first is not None else []
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for an assistant reply to ``messages`` (the assistant turn left open)."""
        from dsk.data.tokenizer import format_chat

        return list(format_chat(self.tokenizer, messages, add_generation_prompt=True))


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """Map short names (eot, bos, pad, system, user, assistant, end) to ids of the added tokens."""
    found: dict[str, int] = {}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for token, idx in vocab.items():
        if not (token.startswith("<|") and token.endswith("|>")):
            continue
        name = token[2:-2].lower()
        name = {"endoftext": "eot", "end_of_text": "eot", "eos": "eot", "begin_of_text": "bos",
                "startoftext": "bos", "im_end": "end", "end_of_turn": "end", "eot_id": "end"}.get(name, name)
        found[name] = idx
    return found
