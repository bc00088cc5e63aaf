"""The lifecycle stages in order: their names, where their code lives, and what feeds them.

This table is data only (dotted paths, no imports), so the library can ask "what comes before
featurize?" without importing a stage, and `dsk --help` starts fast.

    $ dsk --help
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str
    module: str  # dotted path of the stage package: exposes ``Params`` and ``run(**kw)``
    upstream: tuple[str, ...]  # stages whose latest artifact is the default input, newest wins
    implemented: bool
    accepts_raw: bool = False  # takes a user path (file or directory) as input


STAGES: tuple[StageSpec, ...] = (
    StageSpec("clean", "Clean raw text or tables: filters, PII, dedup, outliers, label issues.",
              "dsk.clean", (), implemented=False, accepts_raw=True),
    StageSpec("augment", "Seeded, composable augmentation of text, images and time series.",
              "dsk.augment", ("clean",), implemented=False),
    StageSpec("featurize", "Tokenizer + token shards for text; engineered features for tables.",
              "dsk.featurize", ("augment", "clean"), implemented=True),
    StageSpec("pretrain", "Train a DeepSeek-style MoE model from scratch on featurized data.",
              "dsk.pretrain", ("featurize",), implemented=True),
    StageSpec("finetune", "LoRA/full instruction tuning and DPO on a pretrained model.",
              "dsk.finetune", ("pretrain",), implemented=False, accepts_raw=True),
    StageSpec("quantize", "16/8/4-bit quantization with measured accuracy cost.",
              "dsk.quantize", ("finetune", "pretrain"), implemented=True),
    StageSpec("export", "Export a model to ONNX, Hugging Face or safetensors.",
              "dsk.export", ("quantize", "finetune", "pretrain"), implemented=True),
    StageSpec("serve", "Serve a model over an OpenAI-compatible HTTP API.",
              "dsk.serve", ("export", "quantize", "finetune", "pretrain"), implemented=False),
    StageSpec("eval", "Evaluate a model artifact on held-out data.",
              "dsk.evaluate", ("export", "quantize", "finetune", "pretrain"), implemented=False),
    StageSpec("report", "An HTML report card for an artifact's lineage.",
              "dsk.report", ("eval", "export", "quantize", "finetune", "pretrain"), implemented=False),
)

LIFECYCLE = ("clean", "augment", "featurize", "pretrain", "finetune", "quantize", "export", "serve")
BY_NAME = {s.name: s for s in STAGES}


def spec(name: str) -> StageSpec:
    from dsk.errors import DskError

    try:
        return BY_NAME[name]
    except KeyError:
        raise DskError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def not_implemented() -> list[str]:
    return [s.name for s in STAGES if not s.implemented]
