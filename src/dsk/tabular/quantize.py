"""Weight-only quantization of the table classifier: int8 (or int4 values) per output channel.

Every ``nn.Linear`` in the blocks and the head, and the stacked routed-expert weights, are
stored as integers ``q = round(w / s)`` in ``[-qmax, qmax]`` with one float scale ``s`` per
output row (symmetric, ``qmax = 2^(bits-1) - 1``); the forward pass dequantizes ``q * s``.
The routers, norms and feature embeddings stay float32: they are a few percent of the
weights and the routing decision is the most precision-sensitive op in the network.
``bits=16`` stores float16 weights. Exported to ONNX, a quantized weight stays an int8
initializer followed by Cast and Mul, so the file shrinks by ~4x.

    >>> from dsk.tabular.quantize import quantize_model
    >>> info = quantize_model(model, bits=8)     # in place; returns what was quantized
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.errors import DskError
from dsk.models.model import Experts

SCHEME = "symmetric per-output-channel weight-only"


def _quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q, scale [..., out, 1]) with q stored as int8 (bits <= 8) or float16."""
    if bits == 16:
        return w.detach().to(torch.float16), torch.ones(*w.shape[:-1], 1)
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=-1, keepdim=True).float() / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w.detach().float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """A Linear whose weight is ``qweight * scale`` (int8 or float16 storage)."""

    def __init__(self, out_features: int, in_features: int, bias: bool, bits: int):
        super().__init__()
        dtype = torch.float16 if bits == 16 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=dtype))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int) -> "QuantLinear":
        q = cls(lin.out_features, lin.in_features, lin.bias is not None, bits)
        q.qweight, q.scale = _quantize(lin.weight, bits)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone())
        return q

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class QuantExperts(nn.Module):
    """The routed experts' stacked SwiGLU weights, quantized per (expert, output row)."""

    def __init__(self, n: int, dim: int, inter_dim: int, bits: int):
        super().__init__()
        dtype = torch.float16 if bits == 16 else torch.int8
        for name, shape in (("w1", (n, inter_dim, dim)), ("w2", (n, dim, inter_dim)), ("w3", (n, inter_dim, dim))):
            self.register_buffer(f"q{name}", torch.zeros(shape, dtype=dtype))
            self.register_buffer(f"{name}_scale", torch.ones(*shape[:-1], 1))

    @classmethod
    def from_experts(cls, ex: Experts, bits: int) -> "QuantExperts":
        n, inter_dim, dim = ex.w1.shape
        q = cls(n, dim, inter_dim, bits)
        for name in ("w1", "w2", "w3"):
            qw, s = _quantize(getattr(ex, name), bits)
            setattr(q, f"q{name}", qw)
            setattr(q, f"{name}_scale", s)
        return q

    @property
    def w1(self) -> torch.Tensor:
        return self.qw1.float() * self.w1_scale

    @property
    def w2(self) -> torch.Tensor:
        return self.qw2.float() * self.w2_scale

    @property
    def w3(self) -> torch.Tensor:
        return self.qw3.float() * self.w3_scale

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w1 = self.qw1[e].float() * self.w1_scale[e]
        w2 = self.qw2[e].float() * self.w2_scale[e]
        w3 = self.qw3[e].float() * self.w3_scale[e]
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every Linear/Experts to quantize: not routers, norms, embeddings."""
    out = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, Experts)):
                out.append((parent, name, child))
    return out


def quantize_model(model: nn.Module, bits: int, *, structure_only: bool = False) -> dict[str, Any]:
    """Replace the model's Linear and Experts modules with quantized ones, in place.

    ``structure_only`` builds empty quantized modules (for loading a saved quantized model).
    """
    if bits not in (4, 8, 16):
        raise DskError(f"table models quantize to 16, 8 or 4 bits, not {bits}")
    n_quant = 0
    for parent, name, child in _targets(model):
        if isinstance(child, Experts):
            n, inter_dim, dim = child.w1.shape
            new: nn.Module = QuantExperts(n, dim, inter_dim, bits) if structure_only else QuantExperts.from_experts(child, bits)
            n_quant += 3 * child.w1.numel()
        else:
            new = (QuantLinear(child.out_features, child.in_features, child.bias is not None, bits)
                   if structure_only else QuantLinear.from_linear(child, bits))
            n_quant += child.weight.numel()
        setattr(parent, name, new)
    n_float = sum(p.numel() for p in model.parameters())  # routers, norms, embeddings, biases
    return {"bits": bits, "scheme": SCHEME, "quantized_weights": n_quant, "float_weights": n_float}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the persistent tensors as stored (int8 weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def validation_rows(store: Any, meta: dict[str, Any]):
    """The model's validation rows (x_num, x_cat, y), rebuilt from its training input and seed,
    or None when that artifact is no longer in the store."""
    from dsk.tabular.preprocess import TableSpec, matrices
    from dsk.tabular.data import load_training_table, training_data
    from dsk.tabular.train import split_rows

    train = meta.get("training") or {}
    src = store.find_by_id(train.get("input", "")) if store is not None and train.get("input") else None
    if src is None:
        return None
    info = training_data(store, src)
    df, numeric, categorical, classes, y = load_training_table(info["data"], info["label"])
    spec = TableSpec(label=meta["label"], classes=meta["classes"], transform={}, inputs_numeric=meta["inputs_numeric"],
                     inputs_categorical=meta.get("inputs_categorical", {}))
    x_num, x_cat = matrices(df, spec)
    _, va = split_rows(y, float(train["val_fraction"]), int(train["seed"]))
    return x_num[va], x_cat[va], y[va]


def quantize_artifact(model_dir: Any, out_dir: Any, *, bits: int, store: Any = None, log: Any = None) -> dict[str, Any]:
    """Quantize a table-model artifact into ``out_dir``; returns the measured cost as metrics.

    The cost is measured on the model's own validation rows (same split as training), float vs
    quantized: ROC-AUC, accuracy, the largest probability change and the share of rows whose
    predicted class is unchanged.
    """
    import json
    from pathlib import Path

    import numpy as np

    from dsk.tabular.io import load_table_model, predict_proba, save_table_model
    from dsk.tabular.preprocess import FEATURE_TRANSFORM_DIR
    from dsk.tabular.train import roc_auc

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, spec = load_table_model(model_dir)
    if spec.meta.get("quantization"):
        raise DskError(f"{model_dir} is already quantized ({spec.meta['quantization']['bits']} bits); "
                       f"quantize the float model it came from")
    before = weight_bytes(model)
    val = validation_rows(store, spec.meta)
    proba_float = predict_proba(model, val[0], val[1]) if val is not None else None
    info = quantize_model(model, bits)
    after = weight_bytes(model)
    meta = {k: v for k, v in spec.meta.items() if k not in ("model_type", "format_version", "model")}
    meta["quantization"] = info
    feature_dir = model_dir / FEATURE_TRANSFORM_DIR
    save_table_model(model, out_dir, meta, transform_src=model_dir / "transform.json",
                     feature_transform_src=feature_dir if feature_dir.is_dir() else None)
    metrics: dict[str, Any] = {"bits": bits, "scheme": SCHEME, "weight_bytes_float": before,
                               "weight_bytes_quantized": after, "compression": round(before / after, 3)}
    if val is not None:
        proba_q = predict_proba(model, val[0], val[1])
        y = val[2]
        auc_f, auc_q = roc_auc(y, proba_float), roc_auc(y, proba_q)
        metrics.update({
            "val_rows": int(len(y)), "val_auc_float": auc_f, "val_auc_quantized": auc_q,
            "val_auc_delta": auc_q - auc_f,
            "val_accuracy_float": float((proba_float.argmax(1) == y).mean()),
            "val_accuracy_quantized": float((proba_q.argmax(1) == y).mean()),
            "max_probability_change": float(np.abs(proba_q - proba_float).max()),
            "prediction_agreement": float((proba_q.argmax(1) == proba_float.argmax(1)).mean()),
        })
    else:
        metrics["note"] = "training input no longer in the store: accuracy cost not measured"
    (out_dir / "quantize_report.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    if log is not None:
        msg = f"{bits}-bit: weights {before:,} -> {after:,} bytes"
        if val is not None:
            msg += (f"; val AUC {metrics['val_auc_float']:.4f} -> {metrics['val_auc_quantized']:.4f}, "
                    f"agreement {metrics['prediction_agreement']:.4f}")
        log.info(msg)
    return metrics
