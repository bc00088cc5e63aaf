"""Per-request sampling for a batch of sequences: penalties, temperature, top-k, top-p, seeds.

Each row of a decode batch may belong to a different request with its own settings, so the
settings are applied row by row (vectorised across rows where they can be), and every sequence
draws from its own ``torch.Generator``: a request with a ``seed`` gets the same tokens whatever
else shares the batch.

    >>> import torch
    >>> from dsk.serving.sampling import SamplingParams, SequenceSampler, sample_next
    >>> row = SequenceSampler(SamplingParams(temperature=0.0), prompt_ids=[1, 2], vocab_size=8)
    >>> sample_next(torch.arange(8.0)[None], [row]).tolist()
    [7]
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for; the defaults are the OpenAI API's."""

    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 (or < 0) means no top-k cut
    repetition_penalty: float = 1.0  # > 1 discourages every token already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated text
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SequenceSampler:
    """The sampling state of one sequence: its params, its RNG and the tokens seen so far."""

    params: SamplingParams
    prompt_ids: list[int]
    vocab_size: int
    seed_offset: int = 0  # choice index for n > 1, so each choice differs but reproduces
    generator: torch.Generator = field(init=False)
    output_counts: torch.Tensor | None = field(init=False, default=None)
    seen_mask: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        seed = self.params.seed
        if seed is None:
            seed = secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed((int(seed) + self.seed_offset) % (1 << 63))
        if self.params.has_penalties:
            self.output_counts = torch.zeros(self.vocab_size, dtype=torch.float32)
            self.seen_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            ids = torch.tensor([i for i in self.prompt_ids if 0 <= i < self.vocab_size], dtype=torch.long)
            self.seen_mask[ids] = True

    def observe(self, token: int) -> None:
        if self.output_counts is not None and 0 <= token < self.vocab_size:
            self.output_counts[token] += 1
            self.seen_mask[token] = True  # type: ignore[index]


def apply_penalties(logits: torch.Tensor, sampler: SequenceSampler) -> torch.Tensor:
    """Repetition (CTRL/HF style, over prompt + output), presence and frequency (OpenAI style,
    over the output) penalties on one row of logits [V] (float32, CPU)."""
    p = sampler.params
    if sampler.seen_mask is None:
        return logits
    if p.repetition_penalty != 1.0:
        seen = sampler.seen_mask
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    counts = sampler.output_counts
    if p.frequency_penalty != 0.0:
        logits = logits - p.frequency_penalty * counts
    if p.presence_penalty != 0.0:
        logits = logits - p.presence_penalty * (counts > 0).float()
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row and mask what top-k then top-p cut: returns (sorted masked logits, order).

    ``top_k`` [R] (<= 0: off), ``top_p`` [R] in (0, 1]. The most likely token always survives.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return sorted_logits, order


def sample_next(logits: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """One next token per row of ``logits`` [R, V], each row with its own sampler.

    Returns a LongTensor [R] on the CPU. Sampling runs on the CPU (one transfer of [R, V]
    per step) so that seeded CPU generators give the same tokens on every device.
    """
    logits = logits.detach().float().cpu()
    rows = []
    for r, s in enumerate(samplers):
        row = apply_penalties(logits[r], s) if s.params.has_penalties else logits[r]
        rows.append(row)
    logits = torch.stack(rows) if rows else logits
    out = torch.empty(len(samplers), dtype=torch.long)
    greedy = [r for r, s in enumerate(samplers) if s.params.greedy]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=-1)
    sampled = [r for r, s in enumerate(samplers) if not s.params.greedy]
    if not sampled:
        return out
    temps = torch.tensor([samplers[r].params.temperature for r in sampled], dtype=torch.float32)
    scaled = logits[sampled] / temps[:, None]
    top_k = torch.tensor([samplers[r].params.top_k for r in sampled], dtype=torch.long)
    top_p = torch.tensor([samplers[r].params.top_p for r in sampled], dtype=torch.float32)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = filter_top_k_top_p(scaled, top_k, top_p)
        probs = sorted_logits.softmax(dim=-1)
    else:
        order = None
        probs = scaled.softmax(dim=-1)
    for i, r in enumerate(sampled):
        j = torch.multinomial(probs[i], 1, generator=samplers[r].generator)
        out[r] = order[i, j] if order is not None else j
    return out
