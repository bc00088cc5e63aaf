"""Training checkpoints: weights in safetensors, the rest of the training state in a torch file
loaded with ``weights_only=True`` (plain tensors and numbers; no pickled code runs).

A checkpoint is a directory ``<run>/checkpoints/step-00000100/`` written under a temporary
name and renamed when complete, so a kill mid-write never leaves a half checkpoint. Only the
last ``keep`` checkpoints are kept.

    >>> save_checkpoint(run_dir / "checkpoints", step=100, model=model, trainer_state={...}, keep=3)
    >>> ckpt = latest_checkpoint(run_dir / "checkpoints")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dsk.errors import DskError
from dsk.models import Transformer, config_json, load_state, state_dict_for_save

PREFIX = "step-"


def fingerprint(model_cfg: dict, run_cfg: dict) -> str:
    payload = json.dumps({"model": model_cfg, "run": run_cfg}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_checkpoint(
    directory: Path, *, step: int, model: Transformer, trainer_state: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "model_config": config_json(model.cfg)},
                                              indent=2, sort_keys=True, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    meta = path / "meta.json"
    if not meta.is_file() or not (path / "model.safetensors").is_file() or not (path / "trainer.pt").is_file():
        raise DskError(f"{str(path)!r} is not a complete checkpoint (meta.json, model.safetensors, trainer.pt)")
    return json.loads(meta.read_text())


def load_checkpoint(path: Path, model: Transformer, *, expect_fingerprint: str) -> dict[str, Any]:
    """Load weights into ``model`` and return the trainer state; refuse another config's checkpoint."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if meta.get("fingerprint") != expect_fingerprint:
        theirs = meta.get("model_config", {})
        ours = config_json(model.cfg)
        diff = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        what = f"model {diff[0]}={theirs.get(diff[0])!r}, now {ours.get(diff[0])!r}" if diff else "training settings differ"
        raise DskError(f"checkpoint {str(path)!r} is from another config ({what}); start fresh without --resume")
    load_state(model, load_file(str(path / "model.safetensors")))
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
