"""LoRA adapters for :class:`dsk.models.Transformer`: add, freeze the base, merge, save, load.

A LoRA adapter adds ``scale * B @ A`` (rank ``r``, ``scale = alpha / r``) to a frozen weight
``W``: ``y = x W^T + scale * dropout(x) A^T B^T``. ``B`` starts at zero, so a fresh adapter
leaves the model's outputs unchanged. Targets:

* ``attn``: the attention projections (MLA ``wq``/``wq_a``/``wq_b``/``wkv_a``/``wkv_b``/``wo``,
  or MHA ``wq``/``wk``/``wv``/``wo``);
* ``mlp``: the dense SwiGLU layers and the MoE shared experts (``w1``/``w2``/``w3``);
* ``experts``: the routed experts, one adapter per expert on the stacked ``[E, out, in]``
  weights.

Parameter names of the base stay as they were (``layers.0.attn.wq.weight``); the adapters add
``...wq.lora_A`` / ``...wq.lora_B`` (``...experts.w1_lora_A`` for experts). A model artifact
with adapters stores the base in ``model.safetensors`` and the adapters in
``adapter.safetensors`` + ``adapter_config.json``; :func:`dsk.models.load_model` folds them in.

We write LoRA here rather than use ``peft``: peft pulls transformers + accelerate into the
runtime and cannot put per-expert adapters on our stacked expert tensors; this file is ~150
lines and merges exactly.

    >>> from dsk.models.lora import LoraConfig, add_lora, merge_lora
    >>> add_lora(model, LoraConfig(rank=8, alpha=16, targets=("attn", "mlp")))  # base frozen
    >>> merge_lora(model)                                    # fold into the base weights
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.errors import DskError
from dsk.models.model import MLP, Experts, MoE

TARGETS = ("attn", "mlp", "experts")
ATTN_PROJECTIONS = ("wq", "wq_a", "wq_b", "wk", "wv", "wkv_a", "wkv_b", "wo")  # MLA and MHA
MLP_PROJECTIONS = ("w1", "w2", "w3")
PROJECTIONS = ATTN_PROJECTIONS + MLP_PROJECTIONS
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn", "mlp")
    # only these projections of the attn / mlp targets (e.g. ("wv", "wo")); empty: all of them
    projections: tuple[str, ...] = ()
    # DoRA (Liu et al. 2024): each adapted linear also learns a magnitude per output row,
    # W' = m * (W + scale B A) / ||W + scale B A||_row (linear targets only, not experts)
    dora: bool = False
    init_seed: int = 0  # the adapters' A matrices are drawn from their own generator
    # token ids whose embedding (and output) rows train too: the chat special tokens, which a
    # base pretrained on plain text has never seen (peft calls this trainable_token_indices)
    token_ids: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # filled by add_lora: the adapted names

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["projections"] = list(self.projections)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d["targets"]), projections=tuple(d.get("projections", ())),
                   dora=bool(d.get("dora", False)), init_seed=int(d.get("init_seed", 0)),
                   token_ids=[int(i) for i in d.get("token_ids", [])], modules=list(d.get("modules", [])))


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight`` parameter, same name) plus a low-rank adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator,
                 dora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        self.dropout = dropout
        self.adapters_enabled = True
        dev, dt = base.weight.device, base.weight.dtype
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming-uniform(a=sqrt(5)) as in nn.Linear / peft
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(dev, dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.dora = dora  # a plain attribute: forward() reads it on every call
        if dora:  # starts at the rows' norms, so a fresh DoRA adapter is the identity too
            self.lora_magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1).to(dt))

    def _dora_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """m * (W + scale B A) / ||W + scale B A||_row, computed in ``dtype`` (default: the weights')."""
        weight, a, b, m = (t if dtype is None else t.to(dtype)
                           for t in (self.weight, self.lora_A, self.lora_B, self.lora_magnitude))
        w = weight + (b @ a) * self.scale
        # the norm is a constant for the gradient, as in the paper (sec. 4.3): cheaper, same quality
        return w * (m / w.norm(dim=1).detach()).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapters_enabled:
            return F.linear(x, self.weight, self.bias)
        if self.dora:  # add_lora refuses DoRA with dropout
            return F.linear(x, self._dora_weight(), self.bias)
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if self.dora:
            return self._dora_weight(torch.float32).to(self.weight.dtype)
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)


class LoraExperts(Experts):
    """Routed experts with one adapter per expert on each of w1, w2, w3 (set up by add_lora)."""

    scale: float
    dropout: float
    adapters_enabled: bool

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self.adapters_enabled:
            return super().expert(e, x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x

        def lin(name: str, inp: torch.Tensor, inp_drop: torch.Tensor) -> torch.Tensor:
            w = getattr(self, name)[e]
            a, b = getattr(self, f"{name}_lora_A")[e], getattr(self, f"{name}_lora_B")[e]
            return F.linear(inp, w) + F.linear(F.linear(inp_drop, a), b) * self.scale

        g = F.silu(lin("w1", x, h)) * lin("w3", x, h)
        g_drop = F.dropout(g, self.dropout, self.training) if self.dropout else g
        return lin("w2", g, g_drop)


class LoraEmbedding(nn.Embedding):
    """An ``nn.Embedding`` (same ``weight``) whose rows ``lora_token_ids`` get a trainable delta."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.adapters_enabled = True
        self.register_buffer("lora_token_ids", torch.tensor(token_ids, dtype=torch.long, device=base.weight.device))
        self.lora_token_delta = nn.Parameter(torch.zeros(len(token_ids), self.embedding_dim, device=base.weight.device,
                                                         dtype=base.weight.dtype))

    def effective_weight(self) -> torch.Tensor:
        if not self.adapters_enabled:
            return self.weight
        return self.weight.index_add(0, self.lora_token_ids, self.lora_token_delta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.effective_weight())


class LoraRowsLinear(nn.Linear):
    """The output head with trainable deltas on some rows: its own (untied head), or the embedding's (tied)."""

    def __init__(self, base: nn.Linear, token_ids: list[int], tied_to: LoraEmbedding | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapters_enabled = True
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a registered submodule
        if tied_to is None:
            self.register_buffer("lora_token_ids", torch.tensor(token_ids, dtype=torch.long, device=base.weight.device))
            self.lora_token_delta = nn.Parameter(torch.zeros(len(token_ids), self.in_features,
                                                             device=base.weight.device, dtype=base.weight.dtype))

    def effective_weight(self) -> torch.Tensor:
        if self._tied:
            return self._tied[0].effective_weight()
        if not self.adapters_enabled:
            return self.weight
        return self.weight.index_add(0, self.lora_token_ids, self.lora_token_delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _attn_names(attn: nn.Module) -> list[str]:
    return [n for n in ATTN_PROJECTIONS if hasattr(attn, n)]


def add_lora(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """Freeze every base parameter and add adapters on ``cfg.targets``; returns cfg with ``modules``."""
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad or not cfg.targets:
        raise DskError(f"LoRA target {bad[0] if bad else '(none)'!r} is not one of {', '.join(TARGETS)}")
    if cfg.rank < 1:
        raise DskError(f"LoRA rank must be >= 1, got {cfg.rank}")
    if cfg.dora and cfg.dropout:
        raise DskError("DoRA adapters take no dropout (the adapted weight is computed whole); set the dropout to 0")
    if cfg.dora and "experts" in cfg.targets:
        raise DskError("DoRA is for the attn and mlp targets, not the routed experts")
    unknown = [n for n in cfg.projections if n not in PROJECTIONS]
    if unknown:
        raise DskError(f"LoRA projection {unknown[0]!r} is not one of {', '.join(PROJECTIONS)}")
    if cfg.projections and "experts" in cfg.targets:
        # the routed experts' adapters come as one w1/w2/w3 set (LoraExperts): a subset would be ignored
        raise DskError("LoRA projections choose among the attn and mlp projections; the routed experts "
                       "take adapters on w1, w2 and w3 together, so drop 'experts' from the targets or the projections")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    adapted: list[str] = []

    seen: set[str] = set()  # projection names the targets offer, to check cfg.projections against

    def wrap_linear(parent: nn.Module, name: str, qualified: str) -> None:
        seen.add(name)
        if cfg.projections and name not in cfg.projections:
            return
        base = getattr(parent, name)
        if isinstance(base, LoraLinear):
            raise DskError(f"{qualified} already has a LoRA adapter; merge it first")
        setattr(parent, name, LoraLinear(base, cfg.rank, cfg.alpha, cfg.dropout, gen, dora=cfg.dora))
        adapted.append(qualified)

    for i, block in enumerate(model.layers):
        if "attn" in cfg.targets:
            for n in _attn_names(block.attn):
                wrap_linear(block.attn, n, f"layers.{i}.attn.{n}")
        mlps: list[tuple[nn.Module, str]] = []
        if isinstance(block.ffn, MLP):
            mlps.append((block.ffn, f"layers.{i}.ffn"))
        elif isinstance(block.ffn, MoE) and block.ffn.shared_experts is not None:
            mlps.append((block.ffn.shared_experts, f"layers.{i}.ffn.shared_experts"))
        if "mlp" in cfg.targets:
            for mlp, prefix in mlps:
                for n in MLP_PROJECTIONS:
                    wrap_linear(mlp, n, f"{prefix}.{n}")
        if "experts" in cfg.targets and isinstance(block.ffn, MoE):
            ex: Experts = block.ffn.experts
            ex.__class__ = LoraExperts  # same parameters, same names; only expert() changes
            ex.scale, ex.dropout, ex.adapters_enabled = cfg.scale, cfg.dropout, True
            for n in MLP_PROJECTIONS:
                w = getattr(ex, n)
                E, out_dim, in_dim = w.shape
                a = torch.empty(E, cfg.rank, in_dim).uniform_(-1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim), generator=gen)
                ex.register_parameter(f"{n}_lora_A", nn.Parameter(a.to(w.device, w.dtype)))
                ex.register_parameter(f"{n}_lora_B", nn.Parameter(torch.zeros(E, out_dim, cfg.rank, device=w.device, dtype=w.dtype)))
            adapted.append(f"layers.{i}.ffn.experts")
    missing = [n for n in cfg.projections if n not in seen]
    if missing and seen:
        raise DskError(f"LoRA projection {missing[0]!r} is not in this model's {'/'.join(cfg.targets)} "
                       f"(it has {', '.join(sorted(seen))})")
    if cfg.token_ids:
        bad_ids = [i for i in cfg.token_ids if not 0 <= i < model.embed.num_embeddings]
        if bad_ids:
            raise DskError(f"LoRA token id {bad_ids[0]} is outside the vocabulary of {model.embed.num_embeddings}")
        tied = model.head.weight is model.embed.weight
        model.embed = LoraEmbedding(model.embed, cfg.token_ids)
        model.head = LoraRowsLinear(model.head, cfg.token_ids, model.embed if tied else None)
        adapted += ["embed", "head"]
    # the chat-token rows alone do not count: 'experts' on a dense model adapts nothing of the targets
    if all(m in ("embed", "head") for m in adapted):
        raise DskError(f"LoRA targets {list(cfg.targets)}{' / projections ' + str(list(cfg.projections)) if cfg.projections else ''} match no module of this model (e.g. 'experts' on a dense model)")
    cfg.modules = adapted
    return cfg


def is_adapter_param(name: str) -> bool:
    return "lora_" in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_adapter_param(k)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the model computes the frozen base) or back on."""
    for m in model.modules():
        if hasattr(m, "adapters_enabled"):
            m.adapters_enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and remove it; returns how many were merged."""
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight = nn.Parameter(child.merged_weight(), requires_grad=child.weight.requires_grad)
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, name, plain)
                merged += 1
            elif isinstance(child, (LoraEmbedding, LoraRowsLinear)) and not getattr(child, "_tied", None):
                if isinstance(child, LoraEmbedding):
                    plain = nn.Embedding(child.num_embeddings, child.embedding_dim, device=child.weight.device,
                                         dtype=child.weight.dtype)
                else:
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=child.weight.device, dtype=child.weight.dtype)
                    plain.bias = child.bias
                child.weight.data.index_add_(0, child.lora_token_ids, child.lora_token_delta.data.to(child.weight.dtype))
                plain.weight = child.weight  # the same Parameter, so a tied head stays tied
                setattr(parent, name, plain)
                merged += 1
            elif isinstance(child, LoraRowsLinear):  # tied head: its rows are the embedding's
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
        if isinstance(parent, LoraExperts):
            for n in MLP_PROJECTIONS:
                w = getattr(parent, n)
                a, b = getattr(parent, f"{n}_lora_A"), getattr(parent, f"{n}_lora_B")
                w.copy_((w.float() + torch.bmm(b.float(), a.float()) * parent.scale).to(w.dtype))
                delattr(parent, f"{n}_lora_A")
                delattr(parent, f"{n}_lora_B")
            for attr in ("scale", "dropout", "adapters_enabled"):
                parent.__dict__.pop(attr, None)
            parent.__class__ = Experts
            merged += 1
    # a tied head must still point at the embedding (untouched by LoRA, but keep it explicit)
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return merged


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapters(model: nn.Module, cfg: LoraConfig, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_file(adapter_state(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def read_adapter_config(root: str | Path) -> LoraConfig | None:
    path = Path(root) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        return LoraConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DskError(f"{str(path)!r} is not a valid adapter config ({exc}); the artifact is inconsistent") from None


def load_adapters(model: nn.Module, root: str | Path, *, merge: bool = True) -> LoraConfig | None:
    """Apply the adapters stored next to a model (if any); fold them in unless ``merge=False``."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(root)
    if cfg is None:
        return None
    weights = Path(root) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise DskError(f"{str(root)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the artifact is inconsistent")
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model, cfg)
    state = load_file(str(weights))
    expected = set(adapter_state(model))
    if set(state) != expected:
        diff = sorted(expected ^ set(state))[:3]
        raise DskError(f"adapter weights do not match adapter_config.json ({diff}); the artifact is inconsistent")
    model.load_state_dict(state, strict=False)
    for n, p in model.named_parameters():  # loading is not training: restore the base's flags
        p.requires_grad_(requires.get(n, False))
    if merge:
        merge_lora(model)
    return cfg
