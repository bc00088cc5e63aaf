"""Options of the table classifier, nested as ``table`` in `dsk pretrain`'s parameters.

Pydantic only (no torch), so `dsk --help` stays fast.

    $ dsk pretrain --table '{dim: 64, epochs: 300, patience: 30}'
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsk.config import StageParams


class TableParams(StageParams):
    dim: int = Field(128, ge=4, le=1024, description="Width of a feature token.")
    n_layers: int = Field(2, ge=1, le=24, description="Transformer blocks.")
    n_heads: int = Field(4, ge=1, le=64, description="Attention heads (must divide dim).")
    n_dense_layers: int = Field(0, ge=0, description="The first n blocks use a dense SwiGLU; the rest DeepSeekMoE.")
    n_routed_experts: int = Field(4, ge=0, le=256, description="Routed experts per MoE block (0: every block dense).")
    n_shared_experts: int = Field(1, ge=0, le=8, description="Always-on shared experts per MoE block.")
    n_activated_experts: int = Field(2, ge=1, le=64, description="Top-k routed experts per token.")
    moe_inter_dim: int = Field(128, ge=1, description="Hidden width of one expert.")
    inter_dim: int = Field(64, ge=1, description="Hidden width of the dense SwiGLU blocks.")
    tokens: Literal["flat", "features"] = Field(
        "flat", description="flat: the feature embeddings concatenated into one token (fast); features: one token per feature + [CLS], mixed by attention.")
    feature_dim: int = Field(16, ge=1, le=256, description="Width of one feature's embedding in flat mode (features mode uses dim).")
    n_members: int = Field(
        3, ge=1, le=16, description="Train this many networks from seeds seed, seed+1, ... and average their probabilities (one artifact).")
    num_embedding: Literal["linear", "periodic"] = Field(
        "periodic", description="Numeric feature tokens: periodic (cos/sin of learned frequencies -> linear -> ReLU) or linear (x*w+b).")
    n_frequencies: int = Field(16, ge=1, le=256, description="Frequencies per numeric feature of the periodic embedding.")
    frequency_scale: float = Field(0.1, gt=0, le=100, description="Std of the periodic embedding's initial frequencies.")
    epochs: int = Field(100, ge=1, le=100_000, description="At most this many passes over the training rows.")
    patience: int = Field(30, ge=1, description="Stop when validation AUC has not improved for this many epochs (counted from min_epochs).")
    min_epochs: int = Field(30, ge=0, description="Epochs before this one are neither kept as the best nor counted toward patience.")
    refit: bool = Field(True, description="After early stopping picks the epoch count, retrain on all rows (validation included) for that many epochs.")
    auc_tolerance: float = Field(
        0.005, ge=0, le=0.1, description="Validation AUCs within this of the best count as ties, settled by the lower validation loss.")
    batch_size: int = Field(128, ge=1, description="Rows per step (capped so that an epoch has at least 8 steps on small tables).")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW peak learning rate (after a one-epoch warmup).")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning rate after the one-epoch warmup: cosine decay over `epochs` to lr/100, or constant.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    weight_decay: float = Field(1e-2, ge=0, le=1, description="AdamW weight decay on matrices.")
    val_fraction: float = Field(0.15, gt=0, lt=0.9, description="Stratified share of rows held out for early stopping.")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="Weight the loss by inverse class frequency (balanced) or not.")
    max_minutes: float = Field(0.0, ge=0, description="Stop after this many minutes of training (0 = no limit; not reproducible).")
    threads: int = Field(0, ge=0, le=256, description="torch CPU threads (0 = torch's default).")

    @model_validator(mode="after")
    def _check(self) -> "TableParams":
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim} into an even head width")
        if self.n_routed_experts and self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"n_activated_experts={self.n_activated_experts} exceeds n_routed_experts={self.n_routed_experts}")
        return self
