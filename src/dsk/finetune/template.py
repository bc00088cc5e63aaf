"""The chat template of finetuning, shown by `dsk finetune --show-template`.

The token layout itself is :meth:`dsk.data.tokenizer.Tokenizer.format_chat` (shared with the
server, so a finetuned model is prompted exactly as it was trained); this module renders it
as text for people and says which tokens carry the loss.

    $ dsk finetune --show-template
"""

from __future__ import annotations

from typing import Sequence

from dsk.data.tokenizer import SPECIAL_TOKENS

EXAMPLE = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "reverse: good morrow sir"},
    {"role": "assistant", "content": "Result: sir morrow good"},
]


def render(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The transcript as text with the special tokens spelled out (ids: ``format_chat``)."""
    parts = [SPECIAL_TOKENS["bos"]]
    for m in messages:
        parts.append(f"{SPECIAL_TOKENS[m['role']]}{m['content']}{SPECIAL_TOKENS['end']}")
    if add_generation_prompt:
        parts.append(SPECIAL_TOKENS["assistant"])
    return "".join(parts)


def describe() -> str:
    s = SPECIAL_TOKENS
    return "\n".join([
        "Chat template (dsk.data.tokenizer.Tokenizer.format_chat):",
        f"  {s['bos']}  then per message  <|role|> content {s['end']}   (role: system | user | assistant)",
        f"  a prompt for generation ends with {s['assistant']}",
        "",
        "Loss: only on assistant content and its " + s["end"] + " (the model learns to stop);",
        "      the bos, role tokens, system and user turns are masked out.",
        "Data: {\"messages\": [{\"role\": ..., \"content\": ...}, ...]} or {\"prompt\": ..., \"response\": ...}",
        "      (optional \"system\"); dpo: {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}.",
        "",
        "Example:",
        "  " + render(EXAMPLE),
        "  trained on: " + repr(EXAMPLE[-1]["content"]) + " + " + s["end"],
    ])
