"""Fixed-shape prefill and decode steps (forward pass + sampling), replayed as CUDA graphs.

A decode step of a small model on a GPU is almost all overhead: hundreds of tiny kernels each
launched from Python, plus the host syncs hidden in the model's code (``int(positions.max())``
per layer, the MoE loop's per-expert counts). :class:`StaticRunner` rewrites one serving step so
that it has fixed shapes and never reads a device value on the host:

- attention reads a fixed span of the preallocated cache (a bucket at or above the longest
  running row, see below) under a per-row mask instead of slicing it to that row's exact length
  (MLA in the absorbed form, ``dsk.serving.fast_mla``);
- MoE layers run every routed expert on every token as two wide matmuls, weighted by the
  router's (mostly zero) dense weights, instead of sorting tokens by expert: on a GPU the
  extra FLOPs are free at serving batch sizes, and the shapes no longer depend on the routing;
- sampling (penalties, temperature, top-k/top-p, each row's own settings) is
  :func:`dsk.serving.sampling.sample_rows`, inside the same step.

A decode step comes in variants, chosen per step on the host: rows bucket (1, 2, 4, ... up to
``max_batch_size``) × attention span (the running rows' longest, rounded up to 64, 128, 256, ...
up to the context: a chat of 100 tokens reads 128 cache positions per row, not the whole
context) × sampling mode (greedy / plain temperature / everything: the sort for top-k/top-p and
the penalties only when a running row asks for them). Every variant computes the same tokens;
the masked positions past the span and the skipped sampling parts are identities. On CUDA each
decode variant is captured once as a CUDA graph at start, and each prefill shape (rows bucket ×
prompt-width bucket) the first time it is needed; a step is then a few small copies, one graph
replay and one read of the new tokens (the step's only host sync). Each row's last sampled token
stays on the device as the next step's input (``next_tok``), so :meth:`StaticRunner.launch_decode`
can launch a step before the host has read the previous one's tokens, which come back later
through a ring of pinned host buffers and an event per slot. On the CPU the same functions run
eagerly (the tests check them against the model's own forward there).

    >>> runner = StaticRunner(model, cache, sampling, max_batch_size=16)   # cache has 17 rows
    >>> runner.prefill(0, [[5, 6, 7]])     # -> [next token]
    >>> runner.decode([next_token], [3])   # -> [token after it]
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.serving.sampling import BatchSampler, observe_rows, sample_rows, upload

log = logging.getLogger("dsk.serving")

PREFILL_WIDTHS = (16, 32, 64, 128, 256, 512)  # prompt-width buckets (then multiples of 512)
RING = 8  # slots of host buffers for launched steps (the engine keeps at most 3 steps in flight)
KV_MIN = 64  # the shortest attention span of a decode step (then doubling up to the context)

# what a decode step's sampling computes (see sample_rows' flags): "greedy" (argmax only),
# "plain" (temperature + the draw, no sort and no penalties) and "full" (everything)
SAMPLING_MODES = {"greedy": dict(cut=False, penalties=False, sampled=False),
                  "plain": dict(cut=False, penalties=False, sampled=True),
                  "full": dict(cut=True, penalties=True, sampled=True)}


def buckets(limit: int, start: int = 1) -> list[int]:
    """start, 2 start, 4 start, ... below ``limit``, and ``limit`` itself."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


def sampling_mode(needs: dict[str, bool]) -> str:
    """The cheapest of SAMPLING_MODES that computes what the rows need (``BatchSampler.needs``)."""
    if needs["cut"] or needs["penalties"]:
        return "full"
    return "plain" if needs["sampled"] else "greedy"


def supports_static(model: nn.Module) -> bool:
    """Whether every layer is one that :class:`StaticRunner` knows (plain float weights where it
    reads them directly); quantized or otherwise wrapped layers keep the model's own code."""
    from dsk.models.model import MLA, Attention, Experts, MoE

    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        if isinstance(attn, MLA):
            if type(attn.wkv_b) is not nn.Linear or not attn.wkv_b.weight.is_floating_point():
                return False
        elif not isinstance(attn, Attention):
            return False
        if isinstance(ffn, MoE):
            if type(ffn.experts) is not Experts or not ffn.experts.w1.is_floating_point():
                return False
    return bool(getattr(model.cfg, "causal", True))


class StaticRunner:
    """Prefill and decode steps of a dsk Transformer over ``cache`` with fixed shapes.

    ``cache`` has ``max_batch_size + 1`` rows: the running batch is rows 0..n-1 (as in the
    engine) and the last row is scratch, written by the padding rows of a prefill bucket.
    Decode pads n up to its bucket with the free rows n..bucket-1: what they write lands at
    positions that a later sequence of that row overwrites before its mask can see them.
    """

    def __init__(self, model: nn.Module, cache: Any, sampling: BatchSampler, *, max_batch_size: int,
                 graphs: bool | None = None):
        from dsk.models.model import MoE

        self.model, self.cache, self.sampling = model, cache, sampling
        self.max_batch_size = max_batch_size
        self.scratch = max_batch_size
        assert cache.batch_size == max_batch_size + 1, "the cache needs one scratch row"
        self.device = cache.layers[0][next(iter(cache.layers[0]))].device
        self.max_len = cache.max_len
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.decode_sizes = buckets(max_batch_size)
        self.kv_sizes = buckets(self.max_len, KV_MIN)  # a decode step's attention spans
        dev = self.device
        self.keys = torch.arange(self.max_len, device=dev)
        self.row_ids = torch.arange(max_batch_size + 1, device=dev)
        self.pos_in = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        self.tok_out = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        # each row's last sampled token: the next decode step's input, so that a step can be
        # launched before the host has read the previous one's tokens (moved with its row)
        self.next_tok = torch.zeros(max_batch_size + 1, dtype=torch.long, device=dev)
        self.pinned = self.device.type == "cuda"
        # a ring of host buffers (pinned on CUDA) for each launched step's positions and tokens,
        # allocated once: a step then makes few torch calls, each of which releases the GIL and
        # may have to wait for the HTTP thread to hand it back
        self._pos_host = torch.zeros(RING, max_batch_size, dtype=torch.long, pin_memory=self.pinned)
        self._tok_host = torch.zeros(RING, max_batch_size, dtype=torch.long, pin_memory=self.pinned)
        self._pos_np, self._tok_np = self._pos_host.numpy(), self._tok_host.numpy()
        self._pos_rows, self._tok_rows = list(self._pos_host.unbind(0)), list(self._tok_host.unbind(0))
        self._events = [torch.cuda.Event() for _ in range(RING)] if self.pinned else []
        self._holders: list[PendingTokens | None] = [None] * RING  # the unread handle of each slot
        self._slot = 0
        # MoE experts as two wide matrices: [w1; w3] of every expert stacked, and w2 side by side
        self.moe: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, block in enumerate(model.layers):
            if isinstance(block.ffn, MoE):
                ex = block.ffn.experts
                E, inter, dim = ex.w1.shape
                w13 = torch.cat([ex.w1.detach().reshape(E * inter, dim), ex.w3.detach().reshape(E * inter, dim)])
                w2 = ex.w2.detach().permute(1, 0, 2).reshape(dim, E * inter)  # [D, E*I]
                self.moe[i] = (w13.contiguous(), w2.contiguous())
        self._decode_graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self._prefill_graphs: dict[tuple[int, int], tuple[Any, dict[str, torch.Tensor]]] = {}
        self._pool = None
        self._prefill_failed = False
        if self.graphs:
            try:
                with torch.inference_mode():
                    self._capture_decode()
                    # the usual prompt widths too, so the first requests pay no capture
                    for tb in (w for w in PREFILL_WIDTHS[:3] if w <= self.max_len):
                        for kb in self.decode_sizes:
                            self._prefill_graph(kb, tb)
            except Exception:  # a driver or op that cannot be captured: same steps, launched eagerly
                log.exception("capturing the decode CUDA graphs failed; running the steps eagerly")
                self.graphs = False
                self._decode_graphs.clear()
                self._prefill_graphs.clear()

    # ------------------------------------------------------------------ public steps
    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], mode: str = "full") -> list[int]:
        """One token for each of rows 0..n-1 (at its own position); the sampled next tokens.
        ``mode``: a key of SAMPLING_MODES that covers what the rows need (``sampling_mode``)."""
        n = len(tokens)
        self._to_device(torch.tensor(tokens, dtype=torch.long), self.next_tok[:n])
        return self.launch_decode(positions, mode).result()

    @torch.inference_mode()
    def launch_decode(self, positions: list[int], mode: str = "full") -> "PendingTokens":
        """Launch one decode step of rows 0..n-1 on each row's last sampled token (already on the
        device); the new tokens come later from the returned handle."""
        n = len(positions)
        variant = self.decode_variant(positions, mode)
        slot = self._claim()
        # the whole row of the slot goes over: rows n.. are padding, and any position is fine there
        self._pos_np[slot, :n] = positions
        self.pos_in.copy_(self._pos_rows[slot], non_blocking=self.pinned)
        if self.graphs:
            self._decode_graphs[variant].replay()
        else:
            self._decode_body(*variant)
        self._tok_rows[slot].copy_(self.tok_out, non_blocking=self.pinned)
        return self._pending(slot, n)

    def decode_variant(self, positions: list[int], mode: str) -> tuple[int, int, str]:
        """(rows bucket, attention span, sampling mode) of the step for rows at ``positions``."""
        return (bucket_for(len(positions), self.decode_sizes), bucket_for(max(positions) + 1, self.kv_sizes), mode)

    @torch.inference_mode()
    def prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]:
        """Right-padded prompts into rows first_row..; the first sampled token of each."""
        return self.launch_prefill(first_row, prompts).result()

    @torch.inference_mode()
    def launch_prefill(self, first_row: int, prompts: list[list[int]]) -> "PendingTokens":
        out = self._prefill_launch(first_row, prompts)
        slot = self._claim()
        self._tok_rows[slot][: len(out)].copy_(out, non_blocking=self.pinned)
        return self._pending(slot, len(out))

    def move_row(self, src: int, dst: int) -> None:
        self.next_tok[dst] = self.next_tok[src]

    def _claim(self) -> int:
        """The next ring slot, once the step that used it last has been read (always the case
        while fewer than RING steps are in flight; otherwise that handle reads its tokens now)."""
        slot = self._slot
        self._slot = (slot + 1) % RING
        holder = self._holders[slot]
        if holder is not None:
            holder.result()
        return slot

    def _pending(self, slot: int, n: int) -> "PendingTokens":
        """The handle for the first ``n`` tokens copied into ring slot ``slot``."""
        event = None
        if self._events:
            event = self._events[slot]
            event.record()
        handle = self._holders[slot] = PendingTokens(self, slot, n, event)
        return handle

    def _to_device(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return upload(t, torch.empty_like(t, device=self.device) if out is None else out)

    def _prefill_launch(self, first_row: int, prompts: list[list[int]]) -> torch.Tensor:
        k = len(prompts)
        width = max(len(p) for p in prompts)
        kb = bucket_for(k, self.decode_sizes)
        tb = next((w for w in PREFILL_WIDTHS if w >= width), -(-width // 512) * 512)
        tb = min(tb, self.max_len)
        idx = torch.zeros(kb, tb, dtype=torch.long)
        for r, p in enumerate(prompts):
            idx[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        rows = torch.full((kb,), self.scratch, dtype=torch.long)
        rows[:k] = torch.arange(first_row, first_row + k)
        lengths = torch.ones(kb, dtype=torch.long)
        lengths[:k] = torch.tensor([len(p) for p in prompts])
        graph = None
        if self.graphs and not self._prefill_failed:
            try:
                graph, io = self._prefill_graph(kb, tb)
            except Exception:
                log.exception("capturing a prefill CUDA graph failed; prefilling eagerly from now on")
                self._prefill_failed = True
        if graph is None:
            out = torch.zeros(kb, dtype=torch.long, device=self.device)
            self._prefill_body(self._to_device(idx), self._to_device(rows), self._to_device(lengths), out)
        else:
            self._to_device(idx, io["idx"])
            self._to_device(rows, io["rows"])
            self._to_device(lengths, io["lengths"])
            graph.replay()
            out = io["out"]
        self.next_tok[first_row:first_row + k].copy_(out[:k])
        return out[:k]

    # ------------------------------------------------------------------ graphs
    def _capture(self, body: Any) -> torch.cuda.CUDAGraph:
        # warm up on a side stream (as torch.cuda.graphs asks), then record into the shared pool
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the HTTP threads may touch CUDA (memory stats) while the engine captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            body()
        self._pool = graph.pool()
        return graph

    @torch.inference_mode()
    def _capture_decode(self) -> None:
        """Every decode variant, at start: the warm-up runs write junk into free rows only."""
        self.next_tok.zero_()
        self.pos_in.zero_()
        for b in reversed(self.decode_sizes):  # largest first, so the pool fits all
            for span in reversed(self.kv_sizes):
                for mode in SAMPLING_MODES:
                    self._decode_graphs[b, span, mode] = self._capture(
                        lambda b=b, span=span, mode=mode: self._decode_body(b, span, mode))
        # the warm-up steps counted junk tokens; every row's state is set again when it is admitted
        self.sampling.counts.zero_()
        self.sampling.seen.zero_()
        self.sampling.seed_step.zero_()
        torch.cuda.synchronize(self.device)

    def _prefill_graph(self, kb: int, tb: int) -> tuple[Any, dict[str, torch.Tensor]]:
        """The graph for kb rows of width tb, captured on first use. Its warm-up runs point every
        row at the scratch row, so capturing while sequences are running touches none of them."""
        key = (kb, tb)
        if key not in self._prefill_graphs:
            dev = self.device
            io = {"idx": torch.zeros(kb, tb, dtype=torch.long, device=dev),
                  "rows": torch.full((kb,), self.scratch, dtype=torch.long, device=dev),
                  "lengths": torch.ones(kb, dtype=torch.long, device=dev),
                  "out": torch.zeros(kb, dtype=torch.long, device=dev)}
            graph = self._capture(lambda: self._prefill_body(io["idx"], io["rows"], io["lengths"], io["out"]))
            self._prefill_graphs[key] = (graph, io)
            log.info("captured the prefill graph for %d rows x %d tokens", kb, tb)
        return self._prefill_graphs[key]

    # ------------------------------------------------------------------ the fixed-shape bodies
    def _decode_body(self, b: int, span: int, mode: str = "full") -> None:
        """Rows 0..b-1, attending over cache positions 0..span-1 (every running row's position
        is below ``span``; a padding row beyond it writes its junk outside the span and reads
        nothing that matters), sampling as SAMPLING_MODES[mode] says."""
        m = self.model
        tok, pos = self.next_tok[:b], self.pos_in[:b]
        positions = pos[:, None]
        rows = self.row_ids[:b]
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]
        visible = (self.keys[None, :span] <= positions)[:, None, None, :]  # [b, 1, 1, span]
        h = m.embed(tok[:, None])
        for i, block in enumerate(m.layers):
            layer_cache = {name: t[:b] for name, t in self.cache.layers[i].items()}
            h = h + self._attend_cached(block.attn, block.attn_norm(h), cos, sin, positions, rows, layer_cache,
                                        visible, span)
            h = h + self._ffn(i, block.ffn, block.ffn_norm(h))
        logits = m.logits_of(h[:, -1])
        s = self.sampling
        tokens = sample_rows(logits, s.params[:b], s.counts[:b], s.seen[:b], s.seed_step[:b], **SAMPLING_MODES[mode])
        observe_rows(s.counts, s.seen, s.seed_step, rows, tokens)
        self.tok_out[:b].copy_(tokens)
        self.next_tok[:b].copy_(tokens)

    def _prefill_body(self, idx: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor) -> None:
        m = self.model
        kb, tb = idx.shape
        positions = self.keys[:tb][None].expand(kb, tb)
        cos, sin = m.rope_cos[:tb][None], m.rope_sin[:tb][None]
        h = m.embed(idx)
        for i, block in enumerate(m.layers):
            h = h + self._attend_prompt(block.attn, block.attn_norm(h), cos, sin, positions, rows, self.cache.layers[i])
            h = h + self._ffn(i, block.ffn, block.ffn_norm(h))
        last = h[self.row_ids[:kb], lengths - 1]
        logits = m.logits_of(last)
        s = self.sampling
        tokens = sample_rows(logits, s.params[rows], s.counts[rows], s.seen[rows], s.seed_step[rows])
        observe_rows(s.counts, s.seen, s.seed_step, rows, tokens)
        out.copy_(tokens)

    # ------------------------------------------------------------------ layers
    def _attend_cached(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, rows: torch.Tensor, layer_cache: dict, visible: torch.Tensor,
                       span: int):
        from dsk.models.model import MLA, _write
        from dsk.serving.fast_mla import absorbed_step

        if isinstance(attn, MLA):
            return absorbed_step(attn, x, cos, sin, positions, rows, layer_cache, span, visible)
        B, T, _ = x.shape
        q, k, v = attn.project(x, cos, sin)
        _write(layer_cache["k"], rows, positions, k.transpose(1, 2))
        _write(layer_cache["v"], rows, positions, v.transpose(1, 2))
        keys = layer_cache["k"][:, :span].transpose(1, 2).to(q.dtype)
        values = layer_cache["v"][:, :span].transpose(1, 2).to(q.dtype)
        if attn.n_kv != attn.n_heads:
            keys = keys.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
            values = values.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend_prompt(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, rows: torch.Tensor, layer_cache: dict):
        """Causal attention within the prompts (from position 0), writing their keys into the
        cache rows ``rows``: the model's own cached forward, without reading the cache back."""
        from dsk.models.model import MLA, _write

        B, T, _ = x.shape
        if isinstance(attn, MLA):
            q_nope, q_rope, kv, k_rope = attn.project(x, cos, sin)
            _write(layer_cache["kv"], rows, positions, kv)
            _write(layer_cache["k_rope"], rows, positions, k_rope)
            kv = attn.wkv_b(kv).view(B, T, attn.n_heads, attn.nope + attn.vd).transpose(1, 2)
            k_nope, v = kv.split([attn.nope, attn.vd], dim=-1)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, attn.n_heads, T, attn.rope)], dim=-1)
            q = torch.cat([q_nope, q_rope], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
            return attn.wo(y.transpose(1, 2).reshape(B, T, -1))
        q, k, v = attn.project(x, cos, sin)
        _write(layer_cache["k"], rows, positions, k.transpose(1, 2))
        _write(layer_cache["v"], rows, positions, v.transpose(1, 2))
        if attn.n_kv != attn.n_heads:
            k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
            v = v.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _ffn(self, layer: int, ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer not in self.moe:
            return ffn(x)
        # every routed expert on every token, weighted by the router's dense [N, E] weights
        # (zero for the experts a token was not routed to): the same sum as the model's dispatch
        w13, w2 = self.moe[layer]
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, ids, _ = ffn.gate(flat)
        E = ffn.gate.n_experts
        dense = torch.zeros(flat.shape[0], E, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
        gate_up = F.linear(flat, w13).view(flat.shape[0], 2, E, -1)
        hidden = F.silu(gate_up[:, 0]) * gate_up[:, 1]  # [N, E, I]
        y = F.linear((hidden * dense.to(hidden.dtype)[:, :, None]).reshape(flat.shape[0], -1), w2)
        if ffn.shared_experts is not None:
            y = y + ffn.shared_experts(flat).to(y.dtype)
        return y.view(B, T, D)


class PendingTokens:
    """Tokens of a launched step: a slot of the runner's (pinned) host ring and the event that
    says the copy into it has landed (None on the CPU, where the copy already has)."""

    def __init__(self, runner: StaticRunner, slot: int, n: int, event: Any):
        self.runner, self.slot, self.n, self.event = runner, slot, n, event
        self.tokens: list[int] | None = None

    def result(self) -> list[int]:
        if self.tokens is None:
            if self.event is not None:
                self.event.synchronize()  # releases the GIL while it waits
            self.tokens = self.runner._tok_np[self.slot, : self.n].tolist()
            self.runner._holders[self.slot] = None
        return self.tokens
