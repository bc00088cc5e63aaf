"""Saving and loading a `table-model` artifact (float or quantized).

Layout: ``model.safetensors`` (weights; int8 + scales when quantized), ``config.json``
(``model_type: dsk-table``, the network config, classes, input columns and vocabularies,
``quantization``), ``transform.json`` (the clean stage's fitted cleaning) and, when trained on
a featurize artifact, ``feature_transform/`` (its fitted feature steps).

    >>> from dsk.tabular.io import load_table_model
    >>> model, spec = load_table_model(".dsk/artifacts/pretrain/<id>")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dsk.errors import DskError
from dsk.tabular.model import FORMAT_VERSION, MODEL_TYPE, TableClassifier, TableConfig, build_table_model
from dsk.tabular.preprocess import CLEAN_TRANSFORM, CONFIG, FEATURE_TRANSFORM_DIR, TableSpec


def is_table_model(path: str | Path) -> bool:
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def save_table_model(model: TableClassifier, out_dir: Path, meta: dict[str, Any], *,
                     transform_src: Path, feature_transform_src: Path | None = None) -> None:
    """Write weights, config.json (``meta`` + the network config) and the preprocessing files."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **meta, "model": model.cfg.to_dict()}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if transform_src.resolve() != (out_dir / CLEAN_TRANSFORM).resolve():
        shutil.copyfile(transform_src, out_dir / CLEAN_TRANSFORM)
    if feature_transform_src is not None and feature_transform_src.resolve() != (out_dir / FEATURE_TRANSFORM_DIR).resolve():
        shutil.copytree(feature_transform_src, out_dir / FEATURE_TRANSFORM_DIR)


def copy_preprocessing(src: Path, out_dir: Path) -> None:
    """Carry a table model's transform files into a derived artifact (quantize, export)."""
    shutil.copyfile(src / CLEAN_TRANSFORM, out_dir / CLEAN_TRANSFORM)
    if (src / FEATURE_TRANSFORM_DIR).is_dir():
        shutil.copytree(src / FEATURE_TRANSFORM_DIR, out_dir / FEATURE_TRANSFORM_DIR)


def load_table_model(path: str | Path) -> tuple[TableClassifier, TableSpec]:
    """(model in eval mode, its TableSpec) from a table-model artifact directory."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / "model.safetensors").is_file() or not is_table_model(root):
        raise DskError(f"{str(root)!r} is not a table-model artifact (needs model.safetensors and a dsk-table config.json)")
    spec = TableSpec.load(root)
    if spec.meta.get("format_version") != FORMAT_VERSION:
        raise DskError(f"{str(root)!r}: table model format {spec.meta.get('format_version')!r} is not {FORMAT_VERSION}")
    model = build_table_model(TableConfig.from_dict(spec.meta["model"]))
    quant = spec.meta.get("quantization")
    if quant:
        from dsk.tabular.quantize import quantize_model

        quantize_model(model, int(quant["bits"]), structure_only=True)
    state = load_file(str(root / "model.safetensors"))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise DskError(f"{str(root)!r}: weights do not match config.json ({what}); the artifact is inconsistent")
    model.load_state_dict(state)
    model.eval()
    return model, spec


def predict_proba(model: TableClassifier, x_num, x_cat, batch: int = 4096):
    """Class probabilities (numpy float32 [N, C]) for numpy model inputs."""
    import numpy as np

    out = []
    with torch.no_grad():
        for s in range(0, len(x_num), batch):
            xn = torch.as_tensor(np.ascontiguousarray(x_num[s:s + batch], dtype=np.float32))
            xc = torch.as_tensor(np.ascontiguousarray(x_cat[s:s + batch], dtype=np.int64))
            out.append(model(xn, xc)[0].float().softmax(dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_classes), np.float32)
