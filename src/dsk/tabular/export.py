"""ONNX export of a table model with its preprocessing folded in: raw rows in, probabilities out.

The graph is ``CleanTransform`` (imputation, clipping, robust scaling, in float64 like the
numpy replay) -> the featurize steps (when the model has them, see ``dsk.tabular.features``)
-> the classifier with dense MoE dispatch -> softmax. Inputs:

* ``numeric``: float64 [N, n] raw values of the table's numeric columns in the order of
  ``config.json``'s ``onnx.numeric_columns``; NaN marks a missing value (imputed in-graph);
* ``categorical`` (only when the table has categorical columns): int64 [N, c] codes, i.e.
  the 1-based index of the value in ``onnx.categorical_vocab[column]`` (0 = unseen value),
  with a missing value first replaced by the column's training mode
  (``onnx.categorical_fill``) — :func:`onnx_inputs` does exactly this from a DataFrame.

Output ``probabilities``: float32 [N, n_classes] in the order of ``config.json``'s ``classes``.

After export the graph is run with onnxruntime on seeded synthetic raw rows (with missing
values) and compared with the torch module; the maximum difference is recorded and an
export that differs by more than ``tolerance`` is an error.

    >>> from dsk.tabular.export import export_onnx
    >>> export_onnx(".dsk/artifacts/quantize/<id>", Path("out/"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dsk.errors import DskError
from dsk.tabular.io import copy_preprocessing, load_table_model
from dsk.tabular.model import TableClassifier
from dsk.tabular.preprocess import CONFIG, TableSpec, make_clean_module

OPSET = 17
ONNX_FILE = "model.onnx"


class RawTableModel(nn.Module):
    """Raw numeric values (NaN = missing) + categorical codes -> class probabilities."""

    def __init__(self, model: TableClassifier, spec: TableSpec):
        super().__init__()
        self.clean = make_clean_module(spec.transform)
        self.features = None
        raw = spec.raw_numeric
        if spec.feature_transform is not None:
            from dsk.tabular.features import make_feature_module

            self.features = make_feature_module(spec.feature_transform, spec)
        else:
            missing = [c for c in spec.inputs_numeric if c not in raw]
            if missing:
                raise DskError(f"model input {missing[0]!r} is not a raw numeric column and no feature transform makes it")
            self.register_buffer("take", torch.tensor([raw.index(c) for c in spec.inputs_numeric], dtype=torch.long))
        self.model = model
        self.model.dense_moe = True
        self.has_categorical = bool(raw_categorical_vocab(spec))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor | None = None) -> torch.Tensor:
        x = self.clean(numeric)
        if self.features is not None:  # text columns are one-hot inside the feature transform
            logits, _ = self.model(self.features(x, categorical).float(), None)
        else:
            logits, _ = self.model(x.index_select(1, self.take).float(), categorical)
        return logits.float().softmax(dim=-1)


def raw_categorical_vocab(spec: TableSpec) -> dict[str, list[str]]:
    """The graph's ``categorical`` input: column -> vocabulary (code = index + 1, 0 = unseen)."""
    if spec.feature_transform is not None:
        from dsk.tabular.features import categorical_vocab

        return categorical_vocab(spec.feature_transform)
    return spec.inputs_categorical


def _register_rms_norm(opset: int) -> None:
    """aten::rms_norm as ONNX ops (the TorchScript exporter has no symbolic for it before opset 23)."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    # normalized_shape is (x.shape[-1],) in dsk's RMSNorm, traced as a dynamic value: reduce the last axis
    @symbolic_helper.parse_args("v", "v", "v", "f")
    def rms_norm(g, x, normalized_shape, weight, eps):
        sq = g.op("Mul", x, x)
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.long))
            mean_sq = g.op("ReduceMean", sq, axes, keepdims_i=1)
        else:
            mean_sq = g.op("ReduceMean", sq, axes_i=[-1], keepdims_i=1)
        eps_c = g.op("Constant", value_t=torch.tensor(eps if eps is not None else 1e-6, dtype=torch.float32))
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, eps_c)))
        return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)

    register_custom_op_symbolic("aten::rms_norm", rms_norm, opset)


def synthetic_raw(spec: TableSpec, n: int, seed: int, *, missing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded raw rows shaped like the training table (values around each column's median and
    spread, a ``missing`` share of NaN where the model imputes) for checking an export."""
    rng = np.random.default_rng(seed)
    t = spec.transform
    cols = []
    for c in spec.raw_numeric:
        s = t.get("scale", {}).get(c, {"center": t["impute"].get("fill", {}).get(c, 0.0), "scale": 1.0})
        cols.append(s["center"] + s["scale"] * rng.standard_normal(n))
    x = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
    if spec.imputes_numeric and x.size:
        x[rng.random(x.shape) < missing] = np.nan
    cats = [rng.integers(0, len(v) + 1, n) for v in raw_categorical_vocab(spec).values()]
    codes = np.stack(cats, axis=1).astype(np.int64) if cats else np.zeros((n, 0), np.int64)
    return x.astype(np.float64), codes


def onnx_inputs(frame, spec: TableSpec) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs from a checked raw DataFrame (see dsk.tabular.preprocess.check_frame)."""
    from dsk.tabular.preprocess import encode_categorical

    feeds = {"numeric": frame[spec.raw_numeric].to_numpy(dtype=np.float64)}
    vocab = raw_categorical_vocab(spec)
    if vocab:
        fills = spec.transform.get("categorical", {})
        feeds["categorical"] = np.stack([
            encode_categorical(frame[c].where(frame[c].notna(), fills.get(c, {}).get("fill")), v)
            for c, v in vocab.items()], axis=1)
    return feeds


def export_onnx(model_dir: str | Path, out_dir: Path, *, check_rows: int = 256, seed: int = 0,
                tolerance: float = 1e-4, opset: int = OPSET, log: Any = None) -> dict[str, Any]:
    """Write ``model.onnx`` (+ config.json and the transform files) into ``out_dir``; returns metrics."""
    import onnx
    import onnxruntime as ort

    model, spec = load_table_model(model_dir)
    raw_model = RawTableModel(model, spec).eval()
    x, codes = synthetic_raw(spec, max(check_rows, 2), seed)
    args: tuple[torch.Tensor, ...] = (torch.from_numpy(x),)
    names = ["numeric"]
    if raw_model.has_categorical:
        args += (torch.from_numpy(codes),)
        names.append("categorical")
    _register_rms_norm(opset)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILE
    with torch.no_grad():
        # constant folding off: it would turn int8 weights (Cast * scale) back into float initializers
        torch.onnx.export(raw_model, args, str(path), input_names=names, output_names=["probabilities"],
                          dynamic_axes={n: {0: "rows"} for n in [*names, "probabilities"]}, opset_version=opset,
                          do_constant_folding=False, dynamo=False)
        expected = raw_model(*args).numpy()
    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {"numeric": x}
    if raw_model.has_categorical:
        feeds["categorical"] = codes
    got = session.run(["probabilities"], feeds)[0]
    max_diff = float(np.abs(got - expected).max())
    if not max_diff <= tolerance:
        path.unlink(missing_ok=True)
        raise DskError(f"ONNX export differs from the torch model by {max_diff:.2e} (> {tolerance:g}) on raw rows; "
                       f"this is a bug: report it with the model artifact")
    copy_preprocessing(Path(model_dir), out_dir)
    config = dict(spec.meta)
    config["onnx"] = {
        "file": ONNX_FILE, "opset": opset, "inputs": names, "output": "probabilities",
        "numeric_columns": spec.raw_numeric,
        "categorical_columns": list(raw_categorical_vocab(spec)),
        "categorical_vocab": raw_categorical_vocab(spec),
        "categorical_fill": {c: v.get("fill") for c, v in spec.transform.get("categorical", {}).items()},
        "classes": spec.classes,
        "folded": ["impute:" + spec.transform["impute"]["method"], "clip", "robust_scale"]
        + (["features"] if spec.feature_transform is not None else []),
    }
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    metrics = {"onnx_bytes": path.stat().st_size, "onnx_max_abs_diff": max_diff, "onnx_check_rows": len(x),
               "onnx_opset": opset, "quantized_bits": (spec.meta.get("quantization") or {}).get("bits")}
    if log is not None:
        log.info(f"ONNX: {path.stat().st_size:,} bytes, max |onnxruntime - torch| = {max_diff:.2e} on {len(x)} raw rows")
    return metrics


def onnx_predict(path: str | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], feeds)[0]


__all__ = ["RawTableModel", "export_onnx", "onnx_inputs", "onnx_predict", "synthetic_raw"]
