"""The model's typed configuration and its named presets.

Names follow DeepSeek-V3's reference code (``dim``, ``inter_dim``, ``moe_inter_dim``,
``n_dense_layers``, ``n_routed_experts``, ``n_activated_experts``, ``q_lora_rank``,
``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``, ``score_func``,
``route_scale``) so that exporting to Hugging Face's ``DeepseekV3ForCausalLM`` (MLA) or
``LlamaForCausalLM`` (dense ``mha``) is a renaming of keys.

    >>> from dsk.models import ModelConfig
    >>> cfg = ModelConfig.preset("tiny", vocab_size=512)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dsk.errors import DskError

ATTENTION_KINDS = ("mha", "mla")
MLP_ACTS = ("swiglu", "relu2")
SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 256
    # ---- attention
    attn: str = "mla"  # "mha" (grouped KV heads) or "mla" (multi-head latent attention)
    n_kv_heads: int = 0  # mha only; 0 means n_heads (plain multi-head attention)
    q_lora_rank: int = 0  # mla: 0 means a full-rank query projection (wq)
    kv_lora_rank: int = 32  # mla: width of the compressed KV latent (what the cache stores)
    qk_nope_head_dim: int = 16  # mla: per-head query/key width without rotary
    qk_rope_head_dim: int = 8  # mla: decoupled rotary key width, shared by all heads
    v_head_dim: int = 16  # mla: per-head value width
    rope_theta: float = 10000.0
    causal: bool = True  # False: every position attends to every other (a table classifier's feature tokens)
    # ---- feed-forward: SwiGLU dense layers, then DeepSeekMoE
    inter_dim: int = 192  # hidden width of the dense SwiGLU layers
    n_dense_layers: int = 1  # the first n layers are dense; the rest MoE (if n_routed_experts > 0)
    n_routed_experts: int = 4  # 0 makes every layer dense
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k routed experts per token
    moe_inter_dim: int = 64  # hidden width of one expert
    score_func: str = "softmax"  # router scores: softmax or sigmoid (DeepSeek-V3)
    route_scale: float = 1.0  # multiplies the renormalised routing weights
    bias_update_speed: float = 0.001  # aux-loss-free balancing: bias step per optimizer step
    seq_aux_alpha: float = 0.0  # weight of the sequence-level balance loss (0 = off)
    # ---- misc
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # ---- small-model options (off by default; the `cpu` presets use them, docs/pretrain.md)
    qk_norm: bool = False  # mha: RMSNorm on each head's q and k before rotary (allows higher lr)
    mlp_act: str = "swiglu"  # dense layers: "swiglu" (w2(silu(w1 x) * w3 x)) or "relu2" (w2(relu(w1 x)^2), no w3)
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c) (Gemma 2 / modded-nanogpt)
    zero_init_out: bool = False  # start the residual outputs (wo, w2) at zero: each block starts as the identity

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_layers > self.n_dense_layers

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.n_dense_layers

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise DskError(f"model config: {msg}")

        if self.attn not in ATTENTION_KINDS:
            bad(f"attn={self.attn!r} is not one of {', '.join(ATTENTION_KINDS)}")
        if self.mlp_act not in MLP_ACTS:
            bad(f"mlp_act={self.mlp_act!r} is not one of {', '.join(MLP_ACTS)}")
        if self.qk_norm and self.attn != "mha":
            bad("qk_norm is an mha option (MLA already normalises its latents); drop it or use attn: mha")
        if self.logit_softcap < 0:
            bad(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.score_func not in SCORE_FUNCS:
            bad(f"score_func={self.score_func!r} is not one of {', '.join(SCORE_FUNCS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "inter_dim"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            bad(f"n_heads={self.n_heads} does not divide dim={self.dim}; pick n_heads that divides dim")
        if self.attn == "mha":
            if self.n_heads % self.kv_heads:
                bad(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
            if self.head_dim % 2:
                bad(f"head dim {self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        else:
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 2:
                bad(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 2")
            if self.kv_lora_rank < 1 or self.v_head_dim < 1 or self.qk_nope_head_dim < 0:
                bad("kv_lora_rank and v_head_dim must be >= 1")
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            bad("n_routed_experts and n_shared_experts must be >= 0")
        if self.n_routed_experts and not 1 <= self.n_activated_experts <= self.n_routed_experts:
            bad(
                f"n_activated_experts={self.n_activated_experts} must be in 1..n_routed_experts"
                f"={self.n_routed_experts}"
            )
        if not 0 <= self.n_dense_layers <= self.n_layers:
            bad(f"n_dense_layers={self.n_dense_layers} must be in 0..n_layers={self.n_layers}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "format_version", "quantization"})
        if unknown:
            raise DskError(f"model config: unknown key {unknown[0]!r}; is this a dsk model config.json?")
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset with keyword overrides, e.g. ``preset("tiny", vocab_size=512)``."""
        if name not in PRESETS:
            raise DskError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DskError(f"model config: unknown key {unknown[0]!r}; keys: {', '.join(sorted(known))}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests and smoke runs: MLA + one dense layer + one MoE layer, a few hundred K params
    "tiny": dict(
        dim=64, n_layers=2, n_heads=4, max_seq_len=256, attn="mla", kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=192, n_dense_layers=1,
        n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64,
    ),
    # a dense Llama-shaped model (mha + GQA + SwiGLU): exports to LlamaForCausalLM
    "tiny-dense": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, attn="mha", inter_dim=192,
        n_dense_layers=2, n_routed_experts=0, n_shared_experts=0,
    ),
    # the shapes of the best 180-s CPU runs of benchmarks/pretrain_cpu.py (docs/pretrain.md):
    # small and fast wins on 2 cores; MoE and MLA cost more per token than they give back there
    "cpu": dict(
        dim=128, n_layers=4, n_heads=4, max_seq_len=64, attn="mha", inter_dim=336,
        n_dense_layers=4, n_routed_experts=0, n_shared_experts=0,
    ),
    "cpu-moe": dict(
        dim=128, n_layers=4, n_heads=4, max_seq_len=64, attn="mha", inter_dim=336, n_dense_layers=1,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=1, moe_inter_dim=128, bias_update_speed=0.01,
    ),
    "small": dict(
        dim=256, n_layers=6, n_heads=8, max_seq_len=512, attn="mla", kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, inter_dim=768, n_dense_layers=1,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=128,
    ),
    "base": dict(
        dim=768, n_layers=12, n_heads=12, max_seq_len=1024, attn="mla", q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, inter_dim=2048,
        n_dense_layers=1, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        moe_inter_dim=256, score_func="sigmoid", route_scale=2.5, tie_embeddings=False,
    ),
    # DeepSeek-V3's exact choices (sigmoid router with routed scaling 2.5, low-rank queries,
    # RMSNorm eps 1e-6), so `dsk export --format hf` maps them onto DeepseekV3ForCausalLM exactly
    "tiny-v3": dict(
        dim=64, n_layers=2, n_heads=4, max_seq_len=256, attn="mla", q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=192, n_dense_layers=1,
        n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64,
        score_func="sigmoid", route_scale=2.5, norm_eps=1e-6,
    ),
    "small-v3": dict(
        dim=256, n_layers=6, n_heads=8, max_seq_len=512, attn="mla", q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, inter_dim=768, n_dense_layers=1,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=128,
        score_func="sigmoid", route_scale=2.5, norm_eps=1e-6,
    ),
}

# GPU presets (benchmarks/pretrain_gpu.py, docs/performance.md): GPT-2 124M's shape (12 layers,
# 768 dims, 12 heads, context 1024) as a Llama-style dense model, and an MoE with the same
# active width per token (1 shared + top-3 of 32 routed experts of 512 = one 2048-wide SwiGLU)
PRESETS["gpt2"] = dict(
    dim=768, n_layers=12, n_heads=12, max_seq_len=1024, attn="mha", inter_dim=2048,
    n_dense_layers=12, n_routed_experts=0, n_shared_experts=0,
)
PRESETS["gpt2-moe"] = dict(
    dim=768, n_layers=12, n_heads=12, max_seq_len=1024, attn="mha", inter_dim=2048,
    n_dense_layers=1, n_routed_experts=32, n_shared_experts=1, n_activated_experts=3, moe_inter_dim=512,
    # DeepSeek-V3's sign rule at its step, plus its sequence-wise balance loss at 10x its weight: on BPE text,
    # 400 steps, 2 seeds, load max/mean over the last 200 steps (worst layer) 1.14-1.26 summed and 1.38-1.39
    # per step, vs 1.11-1.13 and 1.68-1.92 at step 0.003 (H100, docs/performance.md)
    bias_update_speed=0.001, seq_aux_alpha=0.001,
)
