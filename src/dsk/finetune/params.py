"""`dsk finetune` parameters: the data, the method (lora | full | dpo), LoRA and DPO knobs, and
the training recipe handed to the shared loop in :mod:`dsk.train`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_serializer

from dsk.config import StageParams, TrainingFields

Target = Literal["attn", "mlp", "experts"]

# the peak learning rate when --lr is not given: adapters tolerate (and need) a larger step
DEFAULT_LR = {"lora": 1e-2, "full": 2e-3, "dpo": 5e-4}


class Params(StageParams):
    late_fields = ("lora_projections", "lora_dora", "lora_plus_ratio")  # left out of the id at their defaults

    data: Optional[str] = Field(
        None,
        description="JSONL file: instructions ({messages: [...]} or {prompt, response}), or for --method dpo "
        "preferences ({prompt, chosen, rejected}). Hashed by content into the artifact id.",
    )
    method: Literal["lora", "full", "dpo"] = Field(
        "lora", description="lora: train adapters on a frozen base; full: train every weight; dpo: preference tuning."
    )
    merge: bool = Field(False, description="Fold the LoRA adapters into the base weights: the artifact is a plain model.")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; adapters are scaled by alpha / rank.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    lora_targets: list[Target] = Field(
        default_factory=lambda: ["attn"],
        description="Where adapters go: attn (attention projections), mlp (dense SwiGLU + shared experts), "
        "experts (routed experts); a list or comma-separated, e.g. --lora-targets attn,mlp.",
    )
    lora_projections: list[str] = Field(
        default_factory=list,
        description="Only these projections of the targets, e.g. --lora-projections wv,wo (attention: wq wk wv wo, "
        "or MLA's wq wq_a wq_b wkv_a wkv_b wo; mlp: w1 w2 w3; not with the experts target); empty: all of them.",
    )
    lora_dora: bool = Field(
        False, description="DoRA (Liu et al. 2024): adapters also learn a magnitude per output row of each adapted "
        "weight (+ out_features parameters each); attn / mlp targets, no dropout; merges exactly.",
    )
    lora_plus_ratio: float = Field(
        1.0, ge=1, le=256,
        description="LoRA+ (Hayou et al. 2024): the adapters' B matrices train at lr * this, A at lr; 1 is plain LoRA.",
    )
    lora_chat_tokens: bool = Field(
        True, description="With LoRA, also train the embedding rows of the chat tokens (<|user|>, <|assistant|>, <|end|> ...), "
        "which a base pretrained on plain text has never seen.",
    )
    dpo_train: Literal["lora", "full"] = Field("lora", description="dpo: train LoRA adapters (with the lora_* settings) or every weight.")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the KL anchor to the reference (the input SFT model).")
    context: Optional[int] = Field(None, ge=8, description="Tokens per training row (default: the base model's max_seq_len).")
    packing: bool = Field(True, description="Pack several short examples into one row (no example is ever split).")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the examples held out for validation loss and exact match.")
    bad_lines: Literal["fail", "skip"] = Field(
        "fail", description="A malformed line, a chat without an assistant turn, or an over-long example: fail, or skip it (to rejects.jsonl)."
    )
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Rows per micro-batch (dpo: preference pairs).")
    grad_accum: int = TrainingFields.grad_accum
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate (default: 1e-2 lora, 2e-3 full, 5e-4 dpo; tuned on the cpu preset, docs/finetune.md).")
    min_lr_ratio: float = TrainingFields.min_lr_ratio
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of trained matrices.")
    grad_clip: float = TrainingFields.grad_clip
    optimizer: Literal["adamw", "lion"] = Field("adamw", description="Optimizer.")
    precision: Literal["fp32", "bf16", "fp16"] = TrainingFields.precision
    device: Literal["auto", "cpu", "cuda", "mps"] = TrainingFields.device
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0 = only at the end).")
    eval_examples: int = Field(64, ge=0, description="Validation examples scored by exact match of a greedy answer at the end (dpo: pairs scored).")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer when scoring exact match.")
    log_every: int = TrainingFields.log_every
    checkpoint_every: int = TrainingFields.checkpoint_every
    checkpoint_every_minutes: float = TrainingFields.checkpoint_every_minutes
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last N checkpoints.")
    max_minutes: float = TrainingFields.max_minutes
    threads: int = TrainingFields.threads

    @field_validator("lora_targets", "lora_projections", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @model_serializer(mode="wrap")
    def _stable_id(self, handler):
        # late fields as in StageParams; the LoRA default lr moved (5e-3 -> 1e-2), so a lora run on
        # the default records the lr it uses and cannot hit an artifact trained at the old one
        data = self._drop_late_defaults(handler(self))
        if self.lr is None and self.method == "lora":
            data["lr"] = DEFAULT_LR["lora"]
        return data

    @property
    def uses_lora(self) -> bool:
        """Adapters on a frozen base: --method lora, or dpo with --dpo-train lora."""
        return self.method == "lora" or (self.method == "dpo" and self.dpo_train == "lora")

    def unused_lora_options(self) -> list[str]:
        """The ``--lora-*`` options set away from their defaults on a run that trains no adapters."""
        if self.uses_lora:
            return []
        return ["--" + name.replace("_", "-") for name in type(self).model_fields
                if name.startswith("lora_") and not self.at_default(name)]

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]
