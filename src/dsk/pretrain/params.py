"""`dsk pretrain` parameters: the model preset (+ overrides) and the training recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dsk.config import StageParams, TrainingFields
from dsk.tabular.params import TableParams

Preset = Literal["tiny", "tiny-dense", "tiny-v3", "cpu", "cpu-moe", "small", "small-v3", "base", "gpt2", "gpt2-moe"]


class Params(StageParams):
    late_fields = ("repeat_fraction", "cuda_graphs")  # left out of the id at their defaults

    preset: Preset = Field("tiny", description="Model preset: tiny (tests), tiny-dense, cpu / cpu-moe (the 180-s CPU benchmark's shapes), small, base, gpt2 (GPT-2 124M's shape, dense), gpt2-moe (same active width, 32 experts); tiny-v3 / small-v3 match DeepSeek-V3 exactly (export to DeepseekV3ForCausalLM).")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="Model config overrides on top of the preset, e.g. '{n_layers: 4, attn: mha, n_routed_experts: 0}'.",
    )
    context: int = Field(256, ge=8, le=65536, description="Training context length in tokens (also the model's max_seq_len).")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch (the global batch: --nproc processes split it).")
    grad_accum: int = TrainingFields.grad_accum
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    max_minutes: float = TrainingFields.max_minutes
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = TrainingFields.min_lr_ratio
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    schedule_clock: Literal["steps", "time"] = Field(
        "steps", description="Cosine over max_steps, or over max_minutes of wall time (time: not reproducible)."
    )
    optimizer: Literal["adamw", "lion", "muon"] = Field(
        "adamw", description="AdamW (fused where available), Lion, or Muon on hidden matrices + AdamW on the rest."
    )
    muon_lr_scale: float = Field(10.0, gt=0, description="With --optimizer muon: Muon's step size is lr * muon_lr_scale.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay of matrices (never norms, biases, embeddings).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam/Lion beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam/Lion beta2.")
    grad_clip: float = TrainingFields.grad_clip
    precision: Literal["fp32", "bf16", "fp16"] = TrainingFields.precision
    device: Literal["auto", "cpu", "cuda", "mps"] = TrainingFields.device
    compile: bool = Field(False, description="torch.compile the model.")
    cuda_graphs: bool = Field(
        False, description="With --compile on one CUDA GPU: replay each step as CUDA graphs (torch.compile's "
        "reduce-overhead mode), so Python does not launch the kernels one by one (0.5–1% faster for GPT-2 124M on "
        "an H100, docs/performance.md); not with --nproc > 1.")
    bf16_residual: bool = Field(
        False, description="With --precision bf16: keep the residual stream in bf16 too (~6% faster on an H100; "
        "slightly different numerics, docs/performance.md)."
    )
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    eval_every: int = Field(200, ge=0, description="Evaluate validation loss and bits per byte every N steps (0 = only at the end).")
    eval_tokens: int = Field(65536, ge=1, description="At most this many validation tokens per evaluation.")
    log_every: int = TrainingFields.log_every
    checkpoint_every: int = TrainingFields.checkpoint_every
    checkpoint_every_minutes: float = TrainingFields.checkpoint_every_minutes
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last N checkpoints.")
    profile: int = Field(0, ge=0, description="Profile N steps with torch.profiler: Chrome trace + top-ops table in the artifact.")
    threads: int = TrainingFields.threads
    repeat_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of training rows made periodic (the row's first 8..context/2 corpus tokens repeated "
        "to its end), so a small model learns in-context copying (induction heads) that instruction tasks "
        "build on; 0 = plain corpus windows. Validation stays plain text (docs/finetune.md).",
    )
    # ---- tables (issue 12): on a table/features input pretrain trains dsk.tabular's classifier
    table: TableParams = Field(
        default_factory=TableParams,
        description="Table classifier options, used when the input is a table or features artifact, e.g. "
        "'{epochs: 100, dim: 64}' (see docs/tables.md); the options above are for language models.",
    )
