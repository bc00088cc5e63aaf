"""A DeepSeek-style decoder-only transformer: RMSNorm, RoPE, MHA/GQA or MLA, SwiGLU, DeepSeekMoE.

One file, read top to bottom: norms and rotary embeddings, the KV cache, the two attention
kinds, the feed-forward layers (dense SwiGLU and the MoE with aux-loss-free balancing), the
block, and the model with ``generate()``. Module and parameter names follow DeepSeek-V3's
reference implementation (``attn.wkv_a``, ``ffn.gate``, ``ffn.shared_experts`` ...).

    >>> from dsk.models import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.preset("tiny", vocab_size=512))
    >>> out = model(idx, targets=targets)        # out.logits, out.loss, out.aux

Rotary embeddings use the "rotate half" layout of Llama / Hugging Face (no interleaving), so
exported q/k weights need no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsk.errors import DskError
from dsk.models import ce_kernel
from dsk.models.config import ModelConfig

# --------------------------------------------------------------------------- basics


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 even under autocast: the fused kernel needs matching dtypes, and a norm is cheap
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim/2] for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by per-row angles ``cos``/``sin`` [B, T, D/2] (rotate-half layout).

    ``head_dim=2`` takes ``x`` as [B, T, H, D] instead: the projections' own memory order, so the
    result needs no transposing copy before attention (nor its gradient after it).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.unsqueeze(head_dim).to(x.dtype), sin.unsqueeze(head_dim).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention(q, k, v, mask=None, causal=False, scale=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in fp32 for bf16/fp16 inputs on CPU.

    Why: torch's CPU flash-attention backward is several times slower in bf16 than in fp32
    (measured 45 vs 12 ms per layer for a d128 model, batch 16 x 128, on an AVX512-BF16 EPYC), which
    cancels bf16 autocast's 3x faster matmuls; on GPUs the bf16 kernels are the fast ones.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs right back
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                               scale=scale)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer, per-row cache. MHA stores k and v; MLA stores only the KV latent + rotary key.

    A row's entries at positions >= its current position are ignored by the attention mask,
    so a serving loop can reuse a row for a new request by simply starting it at position 0.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: Any = None, dtype: Any = None):
        if max_len > cfg.max_seq_len:
            raise DskError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        self.batch_size, self.max_len = batch_size, max_len
        dtype = dtype or torch.float32
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.n_layers):
            if cfg.attn == "mla":
                self.layers.append({
                    "kv": torch.zeros(batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
                    "k_rope": torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype),
                })
            else:
                shape = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
                self.layers.append({
                    "k": torch.zeros(shape, device=device, dtype=dtype),
                    "v": torch.zeros(shape, device=device, dtype=dtype),
                })

    def numel(self) -> int:
        return sum(t.numel() for layer in self.layers for t in layer.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


def cache_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, kv_len]: query at absolute position p sees keys at 0..p of its own row."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def _write(buf: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` [B, T, ...] into ``buf`` [B, L, ...] at per-row positions [B, T]."""
    buf[rows[:, None], positions] = value.to(buf.dtype)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (n_kv_heads < n_heads shares each k/v head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)
        self.causal = cfg.causal
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.norm_eps)

    # one GEMM for q, k and v (Transformer.use_fused); the same function as three
    fuse_projections = False

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B, H, T, D] and k, v [B, n_kv, T, D], rotated: shared by training, the KV-cache
        forward and the server's static decode steps (dsk.serving.graphs)."""
        B, T, _ = x.shape
        if self.fuse_projections and all(type(m) is nn.Linear for m in (self.wq, self.wk, self.wv)):
            # the weights are concatenated on every call (a few MB): the parameters, their names
            # and LoRA/quantisation stay as they are, and the GEMM is 3x wider (docs/performance.md)
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            q, k, v = F.linear(x, w).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k = q.view(B, T, self.n_heads, self.hd), k.view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # rotate in [B, T, H, D] order, then view as [B, H, T, D]: SDPA takes the strides as they are
        q = apply_rope(q, cos, sin, head_dim=2).transpose(1, 2)
        k = apply_rope(k, cos, sin, head_dim=2).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, positions, layer_cache: dict | None, attn_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if layer_cache is None:
            mask, causal = (None, self.causal) if attn_mask is None else (attn_mask, False)
        else:
            rows = torch.arange(B, device=x.device)
            kv_len = int(positions.max()) + 1
            _write(layer_cache["k"], rows, positions, k.transpose(1, 2))
            _write(layer_cache["v"], rows, positions, v.transpose(1, 2))
            k = layer_cache["k"][:, :kv_len].transpose(1, 2).to(q.dtype)
            v = layer_cache["v"][:, :kv_len].transpose(1, 2).to(q.dtype)
            mask, causal = cache_mask(positions, kv_len), False
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = attention(q, k, v, mask, causal)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLA(nn.Module):
    """DeepSeek-V3 multi-head latent attention.

    Keys and values come from a low-rank latent ``c_kv = kv_norm(wkv_a(x))[:kv_lora_rank]``
    expanded by ``wkv_b``; the rotary part of the key is a separate ``qk_rope_head_dim``-wide
    vector shared by all heads. The cache holds only ``c_kv`` and that rotary key.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_head_dim = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, self.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.vd), bias=False)
        self.wo = nn.Linear(self.n_heads * self.vd, cfg.dim, bias=False)
        self.scale = qk_head_dim**-0.5
        self.causal = cfg.causal

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q_nope, q_rope [B, H, T, *], the latent kv [B, T, kv_lora_rank] (what the cache stores)
        and the shared rotary key k_rope [B, T, rope]: shared by the forward, the absorbed decode
        (dsk.serving.fast_mla) and the server's static steps (dsk.serving.graphs)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).squeeze(1)
        return q_nope, q_rope, kv, k_rope

    def forward(self, x, cos, sin, positions, layer_cache: dict | None, attn_mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, kv, k_rope = self.project(x, cos, sin)
        if layer_cache is None:
            mask, causal = (None, self.causal) if attn_mask is None else (attn_mask, False)
        else:
            rows = torch.arange(B, device=x.device)
            kv_len = int(positions.max()) + 1
            _write(layer_cache["kv"], rows, positions, kv)
            _write(layer_cache["k_rope"], rows, positions, k_rope)
            kv = layer_cache["kv"][:, :kv_len].to(kv.dtype)
            k_rope = layer_cache["k_rope"][:, :kv_len].to(k_rope.dtype)
            mask, causal = cache_mask(positions, kv_len), False
        S = kv.shape[1]
        kv = self.wkv_b(kv).view(B, S, self.n_heads, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, S, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        y = attention(q, k, v, mask, causal, self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); or with ``act="relu2"``, w2(relu(w1 x)^2) (no w3)."""

    def __init__(self, dim: int, inter_dim: int, act: str = "swiglu"):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        if act == "swiglu":
            self.w3 = nn.Linear(dim, inter_dim, bias=False)

    fuse_projections = False  # one GEMM for w1 and w3 (Transformer.use_fused); the same function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "w3"):
            return self.w2(F.relu(self.w1(x)).square())
        if self.fuse_projections and type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router: scores per expert, top-k choice with a balancing bias, renormalised weights.

    ``bias`` is DeepSeek-V3's aux-loss-free balancing term (``e_score_correction_bias``): it is
    added to the scores only to *choose* experts, never to weight them, and it is not learned
    by gradient but nudged after each optimizer step by :meth:`update_bias`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_experts = cfg.n_routed_experts
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k], expert ids [N, k], scores [N, E])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        ids = torch.topk(scores + self.bias, self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids, scores

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """Raise the bias of under-loaded experts, lower it for over-loaded ones."""
        self.bias += speed * torch.sign(load.float().mean() - load.float())


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked as [E, ...] so dispatch can slice them."""

    fuse_projections = False

    def __init__(self, n: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def grouped(self, x: torch.Tensor, ends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """All experts at once on expert-sorted rows ``x``; ``ends`` [E] int32 = cumulative counts.

        Three grouped matmuls (``torch._grouped_mm``) instead of 3 x E small ones: no host
        sync for the per-expert counts and one launch per weight, so it compiles into the graph.
        """
        x = x.to(dtype)
        if self.fuse_projections and type(self) is Experts:
            # w1 and w3 as one [E, D, 2I] grouped GEMM (Transformer.use_fused)
            w13 = torch.cat([self.w1.to(dtype), self.w3.to(dtype)], dim=1).transpose(-2, -1)
            gate, up = torch._grouped_mm(x, w13, offs=ends).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.w2.to(dtype).transpose(-2, -1), offs=ends)
        w1, w2, w3 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
        h = F.silu(torch._grouped_mm(x, w1, offs=ends)) * torch._grouped_mm(x, w3, offs=ends)
        return torch._grouped_mm(h, w2, offs=ends)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm``; the backward is the gather ``grad[inverse]``."""
    return _PermuteRows.apply(x, perm, inverse)


def use_grouped_mm(x: torch.Tensor) -> torch.dtype | None:
    """The dtype to run grouped expert matmuls in, or None for the per-expert loop.

    The grouped kernel needs CUDA and bf16 (autocast); CPU and fp32 keep the exact loop.
    """
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return None
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
        return torch.bfloat16
    return torch.bfloat16 if x.dtype == torch.bfloat16 else None


class MoE(nn.Module):
    """DeepSeekMoE: always-on shared experts + top-k of fine-grained routed experts.

    Dispatch sorts the (token, expert) pairs by expert and runs each expert once on the
    contiguous slice of its tokens, then scatters the weighted outputs back with
    ``index_add_``: one Python iteration per *expert*, none per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        )
        # tokens routed to each expert since the last update_bias() (training only)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y, tokens per expert [E], sequence balance loss)."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, ids, scores = self.gate(flat)
        k, E = self.gate.topk, self.gate.n_experts
        # (token, slot) pairs sorted by expert; ``inverse`` undoes the sort. Moving rows with
        # these two permutations (gathers both ways, see permute_rows) replaces indexing
        # whose backward is an atomic scatter, 3x slower on an H100 (docs/performance.md)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # each expert's end in the sorted list: fixed-size, no atomics (bincount's size depends on the data)
        ends = torch.searchsorted(flat_ids[order], torch.arange(E, device=x.device), right=True)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))

        grouped_dtype = use_grouped_mm(flat)
        src = flat.to(grouped_dtype) if grouped_dtype is not None else flat
        routed_in = permute_rows(src.repeat_interleave(k, dim=0), order, inverse)
        if grouped_dtype is not None:
            routed_out = self.experts.grouped(routed_in, ends.to(torch.int32), grouped_dtype)
        else:
            outs = []
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    outs.append(self.experts.expert(e, routed_in[start : start + n]))
                start += n
            routed_out = torch.cat(outs) if outs else routed_in.new_zeros(0, D)
        back = permute_rows(routed_out, inverse, order).view(-1, k, D)  # token-major again
        y = (back.float() * weights.unsqueeze(-1)).sum(dim=1).to(flat.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).to(y.dtype)

        balance = flat.new_zeros((), dtype=torch.float32)
        if self.cfg.seq_aux_alpha > 0 and self.training:
            balance = self.cfg.seq_aux_alpha * sequence_balance_loss(scores, ids, B, T, self.gate.n_experts)
        return y.view(B, T, D), counts, balance


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, B: int, T: int, E: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, sum_i f_i * P_i, averaged over rows.

    f_i = E / (k T) * (tokens of the row routed to i);  P_i = mean over the row of the
    normalised score s_i / sum_j s_j.
    """
    k = ids.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(B, T, E)
    chosen = torch.zeros(B * T, E, device=scores.device).scatter_(1, ids, 1.0).view(B, T, E)
    f = chosen.sum(dim=1) * (E / (k * T))
    p = probs.mean(dim=1)
    return (f * p).sum(dim=-1).mean()


# --------------------------------------------------------------------------- LM head + loss


# the fused head's loss through dsk.models.ce_kernel on CUDA (switches for benchmarks' A/B runs):
# the one-pass kernel (gradient = r * p, one read of the logits; 2.06 vs 2.81 ms on an H100, the head
# 0.85 ms faster a step) or the two-sweep one; fp16 always takes the two sweeps (p = e^(x - x_t) can
# pass fp16's 65504, while bf16 has fp32's range)
triton_cross_entropy = True
cross_entropy_onepass = True


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, with its gradients made in the forward.

    Why not ``F.cross_entropy(head(h))``: that reads the [N, vocab] logits twice from memory
    (the log-softmax in the forward, its gradient in the backward, ~6 ms a step at GPT-2's
    vocabulary on an H100). Here one kernel makes the loss and d loss/d logits of each row
    (``dsk.models.ce_kernel`` on CUDA: 2.1 ms in one pass, 2.8 in two sweeps, where the compiled
    expression below took 4.7; the PyTorch expression elsewhere), the two gradient GEMMs follow at
    once, and no logits are kept for the backward, which only scales the stored gradients
    (docs/performance.md). The one-pass kernel returns d loss/d logits as ``r[:, None] * p``: ``r``
    (one number per row) is applied to the GEMMs' N x D operand and result, never to the N x V matrix.
    Rows are processed in chunks so the intermediates of an eager run stay bounded.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, dtype: torch.dtype, chunk_rows: int):
        hc, wc = h.to(dtype), weight.to(dtype)
        valid_all = targets != ignore_index
        n_valid = valid_all.sum().clamp(min=1)
        cols = torch.arange(weight.shape[0], device=h.device)
        loss = h.new_zeros((), dtype=torch.float32)
        grad_h, grad_w = [], None
        kernel = triton_cross_entropy and ce_kernel.available(h)
        onepass = kernel and cross_entropy_onepass and dtype != torch.float16
        inv_count = (1.0 / n_valid.float()).reshape(1)
        for start in range(0, h.shape[0], chunk_rows):
            hs, ts, valid = hc[start : start + chunk_rows], targets[start : start + chunk_rows], valid_all[start : start + chunk_rows]
            if onepass:
                # d loss/d logits = r * p with r per row: r goes onto the GEMMs' N x D sides
                rows, p, r = ce_kernel.cross_entropy_rows_onepass(hs @ wc.t(), ts, inv_count, ignore_index)
                gh = ((p @ wc) * r[:, None]).to(dtype)
                gw = (p.t() @ (hs * r[:, None]).to(dtype)).float()
            else:
                if kernel:  # loss rows and d loss/d logits in one Triton kernel, no fp32 copy of the logits
                    rows, g = ce_kernel.cross_entropy_rows(hs @ wc.t(), ts, inv_count, ignore_index)
                else:
                    logits = (hs @ wc.t()).float()
                    lse = torch.logsumexp(logits, dim=-1)
                    target_logit = logits.gather(1, torch.where(valid, ts, 0)[:, None]).squeeze(1)
                    rows = torch.where(valid, lse - target_logit, 0.0)
                    # d loss / d logits = (softmax - one_hot) / n_valid on scored rows, 0 on ignored ones
                    scale = valid.float() / n_valid
                    g = ((torch.exp(logits - lse[:, None]) - (cols == ts[:, None]).float()) * scale[:, None]).to(dtype)
                gh, gw = g @ wc, (g.t() @ hs).float()
            loss = loss + rows.sum()
            grad_h.append(gh)
            grad_w = gw if grad_w is None else grad_w + gw
        ctx.save_for_backward(torch.cat(grad_h), grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                       dtype: torch.dtype | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight), targets)`` (mean over scored rows), fused; h [N, D], targets [N].

    ``dtype`` is the matmul dtype (the autocast dtype under autocast); the log-sum-exp is fp32.
    """
    if dtype is None:
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    if chunk_rows is None:  # at most 2^31 logits per chunk: one chunk for GPT-2 at batch 32 x 1024
        chunk_rows = max(1, 2**31 // weight.shape[0])
    return _HeadCrossEntropy.apply(h, weight, targets, ignore_index, dtype, chunk_rows)


# --------------------------------------------------------------------------- block + model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.attn == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.dim, cfg.inter_dim, cfg.mlp_act)

    def forward(self, x, cos, sin, positions, layer_cache=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, layer_cache, attn_mask)
        if isinstance(self.ffn, MoE):
            y, counts, balance = self.ffn(self.ffn_norm(x))
            return x + y, counts, balance
        return x + self.ffn(self.ffn_norm(x)), None, None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when the loss came from the fused head (Transformer.use_fused)
    loss: torch.Tensor | None = None
    aux: dict[str, Any] = field(default_factory=dict)


class Transformer(nn.Module):
    """Token embedding -> ``trunk`` (the blocks) -> final norm -> LM head.

    :meth:`trunk` takes already-embedded inputs, so a model with another input embedding or
    output head (e.g. a table classifier) can reuse the blocks unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.head_dim
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        # speed switches for training (use_fused); they change no parameter and no name
        self.fused_loss = False
        self.residual_dtype: torch.dtype | None = None  # e.g. bf16: the residual stream's dtype (numerics change)
        self.reset_parameters()

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (if configured) logit soft-capping of hidden states ``h``."""
        logits = self.head(self.norm(h))
        if self.cfg.logit_softcap > 0:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    def use_fused(self, enabled: bool = True) -> "Transformer":
        """Training fast paths that compute the same function (tests/test_gpu_paths.py):
        one GEMM for q|k|v and for w1|w3 (dense and routed experts), and the LM head fused with
        the cross-entropy (``forward(targets=...)`` in training then returns ``logits=None``)."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP, Experts)):
                m.fuse_projections = enabled
        self.fused_loss = enabled
        return self

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # residual-stream outputs are scaled down with depth (GPT-2) so the stream stays O(1)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")) or name.endswith("experts.w2"):
                if self.cfg.zero_init_out:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, Gate):
                m.bias.zero_()

    def num_params(self, *, active: bool = False) -> int:
        """Parameter count (tied weights once); ``active=True`` counts k of the routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.modules():
                if isinstance(m, Experts):
                    per = sum(p[0].numel() for p in m.parameters())
                    total -= per * (m.w1.shape[0] - self.cfg.n_activated_experts)
        return total

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_len: int | None = None, *, device=None, dtype=None) -> KVCache:
        device = device or self.embed.weight.device
        if dtype is None:  # match the model (e.g. bf16 when serving), else fp32
            dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, device=device, dtype=dtype)

    def trunk(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, attn_mask=None):
        """Run the blocks on embedded inputs h [B, T, D] at positions [B, T].

        ``attn_mask`` (bool [B, 1, T, T], True = may attend) replaces the causal mask when
        there is no cache, e.g. to keep packed sequences apart (see ``forward(segments=)``).

        Returns (hidden, per-layer expert counts {layer: [E]}, summed balance loss).
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        counts: dict[int, torch.Tensor] = {}
        balance = h.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training and cache is None:
                h, c, b = checkpoint(block, h, cos, sin, positions, None, attn_mask, use_reentrant=False)
            else:
                h, c, b = block(h, cos, sin, positions, layer_cache, attn_mask)
            if c is not None:
                counts[i] = c
                balance = balance + b
        return h, counts, balance

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start_pos: torch.Tensor | int | None = None,
        segments: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits (and the loss for ``targets``) of ``idx`` [B, T].

        ``segments`` [B, T] (no cache) marks packed sequences with one id per sequence: each
        token attends only to earlier tokens of its own sequence, and positions restart at 0
        at every sequence, so packing several examples in a row equals running them apart.
        """
        B, T = idx.shape
        plain = start_pos is None and cache is None  # training/scoring from position 0
        attn_mask = None
        if start_pos is None:
            start_pos = torch.zeros(B, dtype=torch.long, device=idx.device)
        elif isinstance(start_pos, int):
            start_pos = torch.full((B,), start_pos, dtype=torch.long, device=idx.device)
        positions = start_pos.to(idx.device).view(B, 1) + torch.arange(T, device=idx.device)
        if segments is not None and cache is None:
            positions, attn_mask = segment_positions_and_mask(segments)
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        # from position 0 the check needs no device read (a host sync, and a graph break under compile)
        last = T - 1 if plain else (int(positions.max()) if T else -1)
        if last >= limit:
            raise DskError(f"sequence position {last} is beyond the limit of {limit} tokens")
        h = self.embed(idx)
        if self.residual_dtype is not None:
            h = h.to(self.residual_dtype)
        h, counts, balance = self.trunk(h, positions, cache, attn_mask)
        if self.training:
            for i, c in counts.items():
                self.layers[i].ffn.load += c.detach().to(self.layers[i].ffn.load.dtype)
        # the fused head+loss has no soft-capping, so a capped model takes the plain path
        fused = (targets is not None and self.fused_loss and self.training and torch.is_grad_enabled()
                 and type(self.head) is nn.Linear and self.cfg.logit_softcap <= 0)
        logits = None if fused else self.logits_of(h)

        aux: dict[str, Any] = {"expert_counts": counts, "balance_loss": balance}
        loss = None
        if fused:
            ce = head_cross_entropy(self.norm(h).reshape(B * T, -1), self.head.weight, targets.reshape(-1))
            aux["ce_loss"] = ce
            loss = ce + balance if counts else ce
        elif targets is not None:
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            aux["ce_loss"] = ce
            loss = ce + balance if counts else ce
        return ModelOutput(logits=logits, loss=loss, aux=aux)

    # ------------------------------------------------------------------ MoE balancing
    def moe_layers(self) -> dict[int, MoE]:
        return {i: b.ffn for i, b in enumerate(self.layers) if isinstance(b.ffn, MoE)}

    @torch.no_grad()
    def update_router_bias(self) -> dict[int, torch.Tensor]:
        """After an optimizer step: nudge each router's bias toward equal load; reset the counts.

        Returns the per-layer token counts that were used (for logging the balance).
        """
        loads = {}
        for i, moe in self.moe_layers().items():
            load = moe.load.clone()
            # no `load.sum() > 0` test (a host sync): with no tokens, sign(mean - load) is 0 anyway
            if self.cfg.bias_update_speed > 0:
                moe.gate.update_bias(load, self.cfg.bias_update_speed)
            moe.load.zero_()
            loads[i] = load
        return loads

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` [B, T]; temperature 0 is greedy.

        With ``use_cache`` the prompt is run once and each new token costs one position;
        without it the whole sequence is re-run (cropped to max_seq_len). Both give the same
        tokens. Rows that produced ``eos_id`` keep emitting it.
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        cache = None
        if use_cache:
            if T + max_new_tokens > self.cfg.max_seq_len:
                raise DskError(
                    f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.cfg.max_seq_len}"
                )
            cache = self.new_cache(B, T + max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pos = 0
        next_input = idx
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = self(next_input, cache=cache, start_pos=pos).logits[:, -1]
                pos += next_input.shape[1]
            else:
                logits = self(idx[:, -self.cfg.max_seq_len :]).logits[:, -1]
            nxt = sample_next(logits.float(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            next_input = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return idx


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence positions [B, T] and a block-diagonal causal mask [B, 1, T, T] for packed rows."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return idx - start, mask.unsqueeze(1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else top-k/top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
