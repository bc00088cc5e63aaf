"""Saving and loading a model artifact: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``).

    >>> from dsk.models import load_model, save_model
    >>> save_model(model, "out/", tokenizer=tok)
    >>> model, tokenizer, cfg = load_model(".dsk/artifacts/pretrain/<id>")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dsk.errors import DskError
from dsk.models.config import ModelConfig
from dsk.models.model import Transformer

MODEL_TYPE = "dsk-deepseek"
FORMAT_VERSION = 1


def config_json(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **cfg.to_dict()}


def state_dict_for_save(model: Transformer) -> dict[str, torch.Tensor]:
    """Persistent tensors, contiguous, with a tied head stored once (as ``embed.weight``)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_model(model: Transformer, out_dir: str | Path, *, tokenizer: Any = None) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_save(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json(model.cfg), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))


def load_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`save_model` (a missing tied head is fine, anything else is not)."""
    expected = set(state_dict_for_save(model))
    missing, unexpected = expected - set(state), set(state) - expected - {"head.weight"}
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise DskError(f"model weights do not match config.json ({what}); the artifact is inconsistent")
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, *, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer or None, cfg) from a model artifact directory.

    The tokenizer is :class:`dsk.data.tokenizer.Tokenizer` (``encode`` -> list of ids,
    ``decode``, ``eot_id``, ``format_chat``; the Hugging Face object is ``tokenizer.hf``).
    """
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "config.json").is_file() or not (root / "model.safetensors").is_file():
        raise DskError(f"{str(root)!r} is not a model artifact (needs config.json and model.safetensors)")
    data = json.loads((root / "config.json").read_text())
    if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise DskError(f"{str(root)!r} holds a {data.get('model_type')!r} model, not a dsk model")
    cfg = ModelConfig.from_dict(data)
    model = Transformer(cfg)
    load_state(model, load_file(str(root / "model.safetensors")))
    model.to(device).eval()
    tokenizer = None
    if (root / "tokenizer.json").is_file():
        from dsk.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(root / "tokenizer.json")
    return model, tokenizer, cfg
