"""Chat data shared by stages: read instruction / preference JSONL, apply the chat template, pack rows.

Every line is checked: a malformed line, a chat with no assistant turn or an example longer
than the context is reported as ``file:line: problem`` and either raises (``bad_lines="fail"``)
or goes to the caller's rejects list (``"skip"``). `dsk finetune` trains on these records and
`dsk eval` scores held-out ones (:mod:`dsk.evaluation.tasks`).

    >>> recs, rejects = read_jsonl("data/sample/tasks/heldout.jsonl", kind="instruction", bad_lines="fail")
    >>> encoded = encode_instructions(recs, tok, context=128, path=Path("heldout.jsonl"), bad_lines="fail", rejects=[])
    >>> ids, labels = pack(encoded, context=128, pad_id=tok.pad_id, packing=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from dsk.data.tokenizer import CHAT_ROLES, Tokenizer
from dsk.errors import DskError

IGNORE = -100
Kind = Literal["instruction", "preference"]


@dataclass
class Record:
    """One usable line: a conversation (instruction), or a prompt with two answers (preference)."""

    line: int
    messages: list[dict]  # instruction: the whole chat; preference: the prompt turns only
    chosen: str | None = None
    rejected: str | None = None

    @property
    def prompt_messages(self) -> list[dict]:
        """The turns before the last assistant answer (what a model is asked)."""
        if self.chosen is not None:
            return self.messages
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        if self.chosen is not None:
            return self.chosen
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


class BadLine(Exception):
    pass


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadLine("'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise BadLine(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise BadLine(f"message {i}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise BadLine(f"message {i}: content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: dict, key: str) -> str:
    if not isinstance(row.get(key), str):
        raise BadLine(f"{key!r} must be a string")
    return row[key]


def _prompt_turns(row: dict) -> list[dict]:
    turns = []
    if "system" in row:
        turns.append({"role": "system", "content": _text(row, "system")})
    turns.append({"role": "user", "content": _text(row, "prompt")})
    return turns


def parse_line(text: str, kind: Kind, line: int) -> Record:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise BadLine("expected a JSON object")
    if kind == "preference":
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise BadLine(f"a preference row needs prompt, chosen and rejected; {missing[0]!r} is missing")
        return Record(line, _prompt_turns(row), chosen=_text(row, "chosen"), rejected=_text(row, "rejected"))
    if "messages" in row:
        messages = _messages(row["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise BadLine("the conversation has no assistant turn, so there is nothing to learn")
        return Record(line, messages)
    if "prompt" in row and "response" in row:
        return Record(line, [*_prompt_turns(row), {"role": "assistant", "content": _text(row, "response")}])
    if "chosen" in row:
        raise BadLine("this is a preference row; use --method dpo for {prompt, chosen, rejected} data")
    raise BadLine("expected {\"messages\": [...]} or {\"prompt\": ..., \"response\": ...}")


def read_jsonl(path: str | Path, *, kind: Kind, bad_lines: str) -> tuple[list[Record], list[dict]]:
    """Parse every line; returns (records, rejects). ``bad_lines="fail"`` raises on the first problem."""
    p = Path(path)
    if not p.is_file():
        raise DskError(f"data file {str(path)!r} does not exist; pass --data PATH to a JSONL file")
    records: list[Record] = []
    rejects: list[dict] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DskError(f"{p}: not UTF-8 text (byte {exc.start}); save the file as UTF-8 JSONL") from None
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            records.append(parse_line(text, kind, i))
        except BadLine as exc:
            reject(p, i, str(exc), text, bad_lines, rejects)
    if not records:
        why = f"all {len(rejects)} lines were rejected" if rejects else "it is empty"
        raise DskError(f"{p}: no usable {kind} examples ({why}); see the format with `dsk finetune --show-template`")
    return records, rejects


def reject(path: Path, line: int, reason: str, text: str, bad_lines: str, rejects: list[dict]) -> None:
    if bad_lines == "fail":
        raise DskError(f"{path}:{line}: {reason}; fix the line or pass --bad-lines skip")
    rejects.append({"line": line, "reason": reason, "text": text[:500]})


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 where the loss applies
    record: Record
    target_bytes: int  # UTF-8 bytes of the trained text (for bits per byte)


def encode_instructions(records: Sequence[Record], tok: Tokenizer, *, context: int, path: Path,
                        bad_lines: str, rejects: list[dict]) -> list[Encoded]:
    out = []
    for r in records:
        ids, mask = tok.format_chat(r.messages)
        if len(ids) > context:
            reject(path, r.line, f"the example is {len(ids)} tokens, longer than the context of {context} "
                   f"(shorten it, or raise --context up to the model's max_seq_len)", json.dumps(r.messages), bad_lines, rejects)
            continue
        nbytes = sum(len(m["content"].encode()) for m in r.messages if m["role"] == "assistant")
        out.append(Encoded(ids, mask, r, nbytes))
    return out


def encode_preferences(records: Sequence[Record], tok: Tokenizer, *, context: int, path: Path,
                       bad_lines: str, rejects: list[dict]) -> list[tuple[Encoded, Encoded]]:
    out = []
    for r in records:
        pair = []
        for answer in (r.chosen, r.rejected):
            ids, mask = tok.format_chat([*r.messages, {"role": "assistant", "content": answer}])
            pair.append(Encoded(ids, mask, r, len(answer.encode())))
        longest = max(len(e.ids) for e in pair)
        if longest > context:
            reject(path, r.line, f"the pair is {longest} tokens, longer than the context of {context} "
                   f"(shorten it, or raise --context up to the model's max_seq_len)", r.messages[-1]["content"], bad_lines, rejects)
            continue
        out.append((pair[0], pair[1]))
    return out


def pack(examples: Sequence[Encoded], *, context: int, pad_id: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows [N, context] of token ids and labels (ids where trained, -100 elsewhere and on padding)."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        if ids and (not packing or len(ids) + len(e.ids) > context):
            rows.append((ids, labels))
            ids, labels = [], []
        ids = ids + e.ids
        labels = labels + [t if m else IGNORE for t, m in zip(e.ids, e.mask)]
    if ids:
        rows.append((ids, labels))
    out_ids = np.full((len(rows), context), pad_id, dtype=np.int64)
    out_labels = np.full((len(rows), context), IGNORE, dtype=np.int64)
    for i, (r_ids, r_labels) in enumerate(rows):
        out_ids[i, : len(r_ids)] = r_ids
        out_labels[i, : len(r_labels)] = r_labels
    return out_ids, out_labels


def xy_rows(ids: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy())
