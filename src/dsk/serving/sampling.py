"""Per-request sampling for a batch of sequences: penalties, temperature, top-k, top-p, seeds.

Each row of a decode batch may belong to a different request with its own settings, so the
settings are a per-row parameter table and one set of tensor ops samples every row at once
(:func:`sample_rows`, no host sync, so it runs inside the engine's CUDA graphs); every sequence
draws its randomness from a counter-based hash of its own seed and step (:func:`row_noise`): a
request with a ``seed`` gets the same tokens whatever else shares the batch.

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
    """The sampling state of one sequence: its params, its seed and the tokens seen so far."""

    params: SamplingParams
    prompt_ids: list[int]
    vocab_size: int
    seed_offset: int = 0  # choice index for n > 1, so each choice differs but reproduces
    seed: int = field(init=False)  # the request's seed (+ choice index), or a random one
    output_counts: torch.Tensor | None = field(init=False, default=None)
    seen_mask: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        seed = self.params.seed
        if seed is None:
            seed = secrets.randbits(63)
        self.seed = (int(seed) + self.seed_offset) % (1 << 63)
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


# columns of the per-row parameter table that the batched sampler reads
PARAM_COLUMNS = ("temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
NEUTRAL_ROW = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # greedy, no cuts, no penalties


def param_row(p: SamplingParams) -> tuple[float, ...]:
    """One request's settings as a row of the [R, 6] parameter table (see PARAM_COLUMNS)."""
    return (max(p.temperature, 0.0), float(max(p.top_k, 0)), p.top_p, p.repetition_penalty,
            p.presence_penalty, p.frequency_penalty)


_M31 = (1 << 31) - 1
_GOLDEN = 0x9E3779B9


def hash31(x: torch.Tensor) -> torch.Tensor:
    """An integer mixer (Wellons' "lowbias32" shifts and multipliers, modulo 2**31) on int64
    tensors holding values in [0, 2**31): every product stays below 2**63, so no overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M31
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M31
    return x ^ (x >> 16)


def row_noise(seed_step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard exponential draws [R, V], a pure function of each row's (seed, step) [R, 2].

    A counter-based generator (hash the seed, the step and the token id) rather than a
    ``torch.Generator`` per sequence: a row's draws depend on nothing else in the batch, the
    whole batch's noise is a few tensor ops on the device (no per-row host work, no transfer,
    so it lives inside the CUDA graph), and integer ops give the same bits on every device.
    """
    seed, step = seed_step.unbind(-1)
    key = hash31((seed & _M31) ^ hash31(((seed >> 31) & _M31) ^ hash31(step & _M31)))
    offsets = (torch.arange(vocab_size, device=seed_step.device, dtype=torch.long) * _GOLDEN) & _M31
    bits = hash31((key[:, None] + offsets[None, :]) & _M31)
    uniform = ((bits >> 7).float() + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32, never 0 or 1
    return -uniform.log()


def sample_rows(logits: torch.Tensor, params: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
                seed_step: torch.Tensor, *, cut: bool = True, penalties: bool = True,
                sampled: bool = True) -> torch.Tensor:
    """One token per row of ``logits`` [R, V], every row with its own settings, as tensor ops only.

    ``params`` [R, 6] (PARAM_COLUMNS), ``counts`` [R, V] (each token's count in the output so
    far), ``seen`` [R, V] bool (in the prompt or the output), ``seed_step`` [R, 2] int64 (each
    row's seed and how many tokens it has drawn). The draw is the exponential race
    ``argmax(p / noise)``, which picks token i with probability p_i, with the noise from
    :func:`row_noise`: a row's tokens depend only on its seed, and the whole function has fixed
    shapes and no host sync (it runs inside the engine's CUDA graphs). The eager path, which
    knows its rows, skips what no row needs: ``cut`` (the sort for top-k/top-p),
    ``penalties``, ``sampled`` (all rows greedy). Skipped parts are identities, so the tokens
    are the same either way.
    """
    logits = logits.float()
    temp, top_k, top_p, rep, presence, frequency = params.unbind(-1)
    if penalties:
        # repetition (CTRL/HF, over prompt + output), then presence/frequency (OpenAI, output
        # only); neutral settings leave a row's logits bit for bit unchanged
        penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
        logits = torch.where(seen, penalised, logits)
        logits = logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()
    greedy = logits.argmax(dim=-1)
    if not sampled:
        return greedy
    scaled = logits / torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    noise = row_noise(seed_step, logits.shape[-1])
    if cut:
        sorted_logits, order = filter_top_k_top_p(scaled, top_k.long(), top_p)
        race = sorted_logits.softmax(dim=-1) / noise.gather(1, order)
        drawn = order.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
    else:
        drawn = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(temp > 0, drawn, greedy)


def upload(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy host tensor ``src`` into ``dst`` without waiting for the device: on CUDA through a
    fresh pinned buffer, non-blocking (a plain copy would wait for every step already launched;
    the caching host allocator keeps the buffer until its copy has run, so a later upload never
    races it); elsewhere a plain copy."""
    if dst.device.type == "cuda":
        return dst.copy_(src.pin_memory(), non_blocking=True)
    return dst.copy_(src)


def observe_rows(counts: torch.Tensor, seen: torch.Tensor, seed_step: torch.Tensor, rows: torch.Tensor,
                 tokens: torch.Tensor) -> None:
    """After a draw: count each row's new token (for the penalties) and advance its step."""
    flat = rows * counts.shape[-1] + tokens  # flat indices: index_add_/index_fill_ never sync the host
    counts.view(-1).index_add_(0, flat, torch.ones_like(tokens, dtype=counts.dtype))
    seen.view(-1).index_fill_(0, flat, True)
    seed_step.view(-1).index_add_(0, rows * 2 + 1, torch.ones_like(rows))


class BatchSampler:
    """The sampling state of every row of the engine's batch, on the model's device.

    Row r holds the settings, output counts, seen-token mask, seed and step of the sequence in
    cache row r; rows are set when a sequence is admitted and moved with its cache row.
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.rows, self.vocab_size, self.device = rows, vocab_size, device
        self.params = torch.tensor([NEUTRAL_ROW] * rows, dtype=torch.float32, device=device)
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self.seed_step = torch.zeros(rows, 2, dtype=torch.long, device=device)
        self.samplers: list[SequenceSampler | None] = [None] * rows
        self._all_rows = torch.arange(rows, device=device)
        self._needs: dict[tuple[int, int], dict[str, bool]] = {}  # needs() per row range, until rows change

    def set_row(self, row: int, sampler: SequenceSampler) -> None:
        self.samplers[row] = sampler
        upload(torch.tensor(param_row(sampler.params), dtype=torch.float32), self.params[row])
        upload(torch.tensor([sampler.seed, 0], dtype=torch.long), self.seed_step[row])
        self.counts[row].zero_()
        if sampler.seen_mask is not None:
            upload(sampler.seen_mask, self.seen[row])
        else:
            self.seen[row].zero_()
        self._needs.clear()

    def move_row(self, src: int, dst: int) -> None:
        self.samplers[dst], self.samplers[src] = self.samplers[src], None
        for t in (self.params, self.counts, self.seen, self.seed_step):
            t[dst] = t[src]
        self._needs.clear()

    def needs(self, start: int, stop: int) -> dict[str, bool]:
        """Which parts of :func:`sample_rows` rows start..stop-1 need (the rest can be skipped)."""
        key = (start, stop)
        if key not in self._needs:
            active = [s.params for s in self.samplers[start:stop] if s is not None]
            sampled = [p for p in active if not p.greedy]
            self._needs[key] = {"cut": any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
                                "penalties": any(p.has_penalties for p in active), "sampled": bool(sampled)}
        return self._needs[key]

    def sample(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """Eager: tokens [k] for logits [k, V] of rows start..start+k-1, counted for the penalties."""
        stop = start + logits.shape[0]
        rows = slice(start, stop)
        tokens = sample_rows(logits, self.params[rows], self.counts[rows], self.seen[rows], self.seed_step[rows],
                             **self.needs(start, stop))
        observe_rows(self.counts, self.seen, self.seed_step, self._all_rows[rows], tokens)
        return tokens


def sample_next(logits: torch.Tensor, samplers: list[SequenceSampler]) -> torch.Tensor:
    """One next token per row of ``logits`` [R, V], each row with its own sampler.

    Returns a LongTensor [R] on the CPU; the samplers' own counts are not updated (call
    ``observe``). The engine keeps the same state batched in a :class:`BatchSampler`.
    """
    logits = logits.detach().float().cpu()
    state = BatchSampler(len(samplers), logits.shape[-1], torch.device("cpu"))
    for r, s in enumerate(samplers):
        state.set_row(r, s)
        if s.output_counts is not None:
            state.counts[r] = s.output_counts
    return sample_rows(logits, state.params, state.counts, state.seen, state.seed_step,
                       **state.needs(0, len(samplers)))
