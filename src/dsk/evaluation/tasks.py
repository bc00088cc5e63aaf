"""Scoring a chat model on held-out tasks: exact match of greedy answers, and preference accuracy.

Shared by `dsk finetune` (its held-out split) and `dsk eval --tasks` (a held-out JSONL file):

    >>> from dsk.evaluation.tasks import exact_match, preference_accuracy
    >>> exact_match(model, tok, records, max_new_tokens=32)        # -> (accuracy, predictions)
    >>> preference_accuracy(model, pairs, pad_id=tok.pad_id)       # share with log p(chosen) > log p(rejected)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from dsk.data.chat import IGNORE, Encoded, Record, pack, xy_rows
from dsk.data.tokenizer import Tokenizer


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not -100: [B, T, V], [B, T] -> [B]."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


@torch.no_grad()
def generate_answers(model, tok: Tokenizer, prompts: Sequence[list[dict]], *, max_new_tokens: int,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers to chat prompts (prompts of equal token length are batched together)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [tok.format_chat(p, add_generation_prompt=True)[0] for p in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    answers = [""] * len(prompts)
    end = tok.end_id
    for length, members in sorted(by_len.items()):
        new = min(max_new_tokens, model.cfg.max_seq_len - length)
        if new <= 0:
            continue
        for s in range(0, len(members), batch_size):
            chunk = members[s : s + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            out = model.generate(idx, new, temperature=0.0, eos_id=end)[:, length:].tolist()
            for i, ids in zip(chunk, out):
                if end in ids:
                    ids = ids[: ids.index(end)]
                answers[i] = tok.decode(ids)
    return answers


def is_exact(prediction: str, answer: str) -> bool:
    """The exact-match rule: equal once surrounding whitespace is trimmed."""
    return prediction.strip() == answer.strip()


def exact_match(model, tok: Tokenizer, records: Sequence[Record], *, max_new_tokens: int) -> tuple[float, list[str]]:
    """Share of records whose greedy answer equals the reference answer (whitespace-trimmed)."""
    if not records:
        return float("nan"), []
    preds = generate_answers(model, tok, [r.prompt_messages for r in records], max_new_tokens=max_new_tokens)
    hits = sum(is_exact(p, r.answer) for p, r in zip(preds, records))
    return hits / len(records), preds


@torch.no_grad()
def pair_logps(model, pairs: Sequence[tuple[Encoded, Encoded]], *, pad_id: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probabilities (chosen [N], rejected [N]) under ``model``."""
    model.eval()
    device = next(model.parameters()).device
    width = max(len(e.ids) for pair in pairs for e in pair) + 1
    out = []
    for side in (0, 1):
        ids, labels = pack([p[side] for p in pairs], context=width, pad_id=pad_id, packing=False)
        logps = []
        for i in range(0, len(ids), batch_size):
            x, y = xy_rows(ids[i : i + batch_size], labels[i : i + batch_size])
            logps.append(sequence_logps(model(x.to(device)).logits, y.to(device)).cpu())
        out.append(torch.cat(logps))
    return out[0], out[1]


def preference_accuracy(model, pairs: Sequence[tuple[Encoded, Encoded]], *, pad_id: int) -> float:
    """Share of pairs where the model gives the chosen answer the higher log-likelihood."""
    if not pairs:
        return float("nan")
    chosen, rejected = pair_logps(model, pairs, pad_id=pad_id)
    return float((chosen > rejected).float().mean())
