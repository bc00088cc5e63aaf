"""The table classifier: feature tokens through DeepSeek-style MoE blocks to a softmax head.

Each numeric feature j becomes a token ``x_j * w_j + b_j`` (FT-Transformer's feature
tokenizer), each categorical feature an embedding of its value plus a per-column bias; a
learned [CLS] token joins them. The tokens run through the same ``Block`` as the language
model (RMSNorm, attention, DeepSeekMoE feed-forward with shared + routed experts), built from
a ``ModelConfig`` with ``causal=False`` so every token sees every other; rotary angles are
all zero (positions carry no meaning in a set of features: the per-feature embedding says
which feature a token is). The [CLS] token's final state goes to a linear softmax head.

    >>> from dsk.tabular.model import TableConfig, TableClassifier
    >>> cfg = TableConfig(n_numeric=30, cat_cardinalities=[], n_classes=2)
    >>> model = TableClassifier(cfg)
    >>> logits, counts = model(x_num)            # x_num: float [B, 30]

``model.dense_moe = True`` computes every routed expert on every token and mixes them with
the router's top-k weights: the same function as the sparse dispatch (up to float summation
order) without data-dependent shapes, which is what ONNX export needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.errors import DskError
from dsk.models import Block, ModelConfig, MoE, RMSNorm

MODEL_TYPE = "dsk-table"
FORMAT_VERSION = 1


@dataclass
class TableConfig:
    n_numeric: int
    cat_cardinalities: list[int] = field(default_factory=list)  # per categorical column, incl. the unknown slot 0
    n_classes: int = 2
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_dense_layers: int = 0  # the first n blocks use a dense SwiGLU; the rest DeepSeekMoE
    inter_dim: int = 64
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_inter_dim: int = 32
    tokens: str = "features"  # "features": one token per feature + [CLS]; "flat": one token of all features
    feature_dim: int = 16  # width of one feature's embedding in "flat" mode (in "features" mode: dim)
    n_members: int = 1  # >1: an ensemble of this many networks (seeds seed, seed+1, ...), probabilities averaged
    num_embedding: str = "linear"  # "linear" (x*w+b) or "periodic" (PLR); old configs lack it: linear
    n_frequencies: int = 16
    frequency_scale: float = 0.1
    score_func: str = "softmax"
    bias_update_speed: float = 0.001
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_numeric < 0 or self.n_numeric + len(self.cat_cardinalities) < 1:
            raise DskError("table model: needs at least one feature column")
        if self.n_classes < 2:
            raise DskError(f"table model: needs >= 2 classes, got {self.n_classes}")
        if self.n_members < 1:
            raise DskError(f"table model: n_members must be >= 1, got {self.n_members}")
        if self.tokens not in ("features", "flat"):
            raise DskError(f"table model: tokens must be features or flat, not {self.tokens!r}")
        if self.num_embedding not in ("linear", "periodic"):
            raise DskError(f"table model: num_embedding must be linear or periodic, not {self.num_embedding!r}")
        if any(c < 1 for c in self.cat_cardinalities):
            raise DskError("table model: every categorical column needs a cardinality >= 1")
        self.trunk_config()  # validates dim/heads/experts with the trunk's own checks

    @property
    def n_tokens(self) -> int:
        return 1 if self.tokens == "flat" else self.n_numeric + len(self.cat_cardinalities) + 1

    @property
    def embed_dim(self) -> int:
        return self.feature_dim if self.tokens == "flat" else self.dim

    def trunk_config(self) -> ModelConfig:
        """The language model's config for the shared blocks: MHA, non-causal, MoE feed-forward."""
        return ModelConfig(
            vocab_size=1, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            max_seq_len=max(self.n_tokens, 2), attn="mha", causal=False, inter_dim=self.inter_dim,
            n_dense_layers=self.n_dense_layers, n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts, n_activated_experts=self.n_activated_experts,
            moe_inter_dim=self.moe_inter_dim, score_func=self.score_func,
            bias_update_speed=self.bias_update_speed, tie_embeddings=False, init_std=self.init_std,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TableConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def dense_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE on x [B, T, D] with every expert run on every token (export-friendly).

    The router picks the same top-k experts with the same weights as ``MoE.forward``; the
    unpicked experts get weight 0, so the output equals the sparse dispatch.
    """
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    weights, ids, _ = moe.gate(flat)
    mix = torch.zeros(flat.shape[0], moe.gate.n_experts, dtype=weights.dtype, device=x.device)
    mix = mix.scatter(1, ids, weights)  # [N, E]
    ex = moe.experts
    h = F.silu(torch.einsum("nd,eid->nei", flat, ex.w1)) * torch.einsum("nd,eid->nei", flat, ex.w3)
    out = torch.einsum("nei,edi->ned", h, ex.w2)  # [N, E, D]
    y = (out.float() * mix.unsqueeze(-1)).sum(dim=1).to(flat.dtype)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(B, T, D)


class TableClassifier(nn.Module):
    def __init__(self, cfg: TableConfig):
        super().__init__()
        self.cfg = cfg
        trunk = cfg.trunk_config()
        n_cat = len(cfg.cat_cardinalities)
        if cfg.num_embedding == "periodic":
            # PLR (Gorishniy et al. 2022, "On Embeddings for Numerical Features"): per feature,
            # cos/sin of learned frequencies -> linear -> ReLU. Lets the network cut a feature at
            # sharp thresholds the way trees do; the plain x*w+b token is a single direction.
            self.num_frequencies = nn.Parameter(torch.empty(cfg.n_numeric, cfg.n_frequencies))
            self.num_weight = nn.Parameter(torch.empty(cfg.n_numeric, 2 * cfg.n_frequencies, cfg.embed_dim))
        else:
            self.num_weight = nn.Parameter(torch.empty(cfg.n_numeric, cfg.embed_dim))
        self.num_bias = nn.Parameter(torch.empty(cfg.n_numeric, cfg.embed_dim))
        self.cat_embed = nn.Embedding(max(sum(cfg.cat_cardinalities), 1), cfg.embed_dim)
        self.cat_bias = nn.Parameter(torch.empty(n_cat, cfg.embed_dim))
        offsets = torch.tensor([0, *cfg.cat_cardinalities[:-1]], dtype=torch.long).cumsum(0)[:n_cat]
        self.register_buffer("cat_offsets", offsets, persistent=False)
        if cfg.tokens == "flat":
            # the concatenated feature embeddings -> one token: an MLP-PLR-style trunk, far cheaper
            # than attention over one token per feature (digits: 1 token instead of 65)
            self.flatten = nn.Linear((cfg.n_numeric + n_cat) * cfg.embed_dim, cfg.dim)
        else:
            self.cls = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.layers = nn.ModuleList(Block(trunk, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, trunk.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)
        self.head_dim = trunk.head_dim
        self.dense_moe = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        # feature tokens start at unit scale: a scaled feature times a N(0, 1/dim) vector per
        # feature keeps the RMS of a token near that of the feature, like FT-Transformer's init
        if self.cfg.num_embedding == "periodic":
            nn.init.normal_(self.num_frequencies, 0.0, self.cfg.frequency_scale)
            # like nn.Linear's init over the 2K cos/sin inputs
            bound = 1.0 / math.sqrt(2 * self.cfg.n_frequencies)
            nn.init.uniform_(self.num_weight, -bound, bound)
        else:
            nn.init.normal_(self.num_weight, 0.0, 1.0 / math.sqrt(self.cfg.embed_dim))
        nn.init.normal_(self.num_bias, 0.0, 1.0 / math.sqrt(self.cfg.embed_dim))
        nn.init.normal_(self.cat_embed.weight, 0.0, 1.0 / math.sqrt(self.cfg.embed_dim))
        nn.init.normal_(self.cat_bias, 0.0, 1.0 / math.sqrt(self.cfg.embed_dim))
        if self.cfg.tokens == "flat":
            self.flatten.reset_parameters()
        else:
            nn.init.normal_(self.cls, 0.0, 1.0 / math.sqrt(self.cfg.dim))
        for name, p in self.layers.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                block.ffn.gate.bias.zero_()
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> dict[int, MoE]:
        return {i: b.ffn for i, b in enumerate(self.layers) if isinstance(b.ffn, MoE)}

    def tokens(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n_numeric] floats and [B, n_cat] codes -> tokens [B, n_tokens, dim] ([CLS] first)."""
        B = x_num.shape[0]
        flat = self.cfg.tokens == "flat"
        parts = [] if flat else [self.cls.expand(B, 1, self.cfg.dim).to(x_num.dtype)]
        if self.cfg.n_numeric:
            parts.append(self.numeric_tokens(x_num))
        if self.cfg.cat_cardinalities:
            if x_cat is None:
                raise DskError("table model: this model has categorical columns; pass their codes")
            parts.append(self.cat_embed(x_cat + self.cat_offsets) + self.cat_bias)
        h = torch.cat(parts, dim=1)
        return self.flatten(h.reshape(B, 1, -1)) if flat else h

    def numeric_tokens(self, x_num: torch.Tensor) -> torch.Tensor:
        """[B, n_numeric] -> [B, n_numeric, embed_dim]."""
        if self.cfg.num_embedding == "linear":
            return x_num.unsqueeze(-1) * self.num_weight + self.num_bias
        angle = (2 * math.pi) * x_num.unsqueeze(-1) * self.num_frequencies  # [B, F, K]
        periodic = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)  # [B, F, 2K]
        return F.relu(torch.einsum("bfk,fkd->bfd", periodic, self.num_weight) + self.num_bias)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None):
        """Logits [B, n_classes] and the routed-expert token counts per MoE layer {layer: [E]}."""
        h = self.tokens(x_num, x_cat)
        B, T, _ = h.shape
        # rotary angle 0 everywhere: the rotation is the identity (features form a set)
        cos = h.new_ones(1, T, self.head_dim // 2)
        sin = h.new_zeros(1, T, self.head_dim // 2)
        counts: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            if self.dense_moe and isinstance(block.ffn, MoE):
                h = h + block.attn(block.attn_norm(h), cos, sin, None, None)
                h = h + dense_moe(block.ffn, block.ffn_norm(h))
            else:
                h, c, _ = block(h, cos, sin, None)
                if c is not None:
                    counts[i] = c
        return self.head(self.norm(h[:, 0])), counts

    @torch.no_grad()
    def update_router_bias(self, counts: dict[int, torch.Tensor]) -> None:
        """DeepSeek-V3's aux-loss-free balancing: nudge each router's bias toward equal load."""
        for i, moe in self.moe_layers().items():
            if i in counts and self.cfg.bias_update_speed > 0:
                moe.gate.update_bias(counts[i], self.cfg.bias_update_speed)

    def predict_proba(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self(x_num, x_cat)[0].float().softmax(dim=-1)


class TableEnsemble(nn.Module):
    """``cfg.n_members`` TableClassifiers trained from different seeds; their probabilities averaged.

    ``forward`` returns the log of the mean probability as the logits, so ``softmax(logits)`` is
    the mean probability and every caller (training loss, predict, the ONNX graph) is unchanged.
    """

    def __init__(self, cfg: TableConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(TableClassifier(cfg) for _ in range(cfg.n_members))

    @property
    def dense_moe(self) -> bool:
        return all(m.dense_moe for m in self.members)

    @dense_moe.setter
    def dense_moe(self, value: bool) -> None:
        for m in self.members:
            m.dense_moe = value

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None):
        proba = torch.stack([m(x_num, x_cat)[0].float().softmax(dim=-1) for m in self.members]).mean(dim=0)
        return torch.log(proba.clamp_min(1e-12)), {}

    def predict_proba(self, x_num: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self(x_num, x_cat)[0].softmax(dim=-1)


def build_table_model(cfg: TableConfig) -> nn.Module:
    """A TableClassifier, or a TableEnsemble of them when ``cfg.n_members > 1``."""
    return TableEnsemble(cfg) if cfg.n_members > 1 else TableClassifier(cfg)
