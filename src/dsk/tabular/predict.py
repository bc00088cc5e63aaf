"""Predict class probabilities for raw table rows with a table-model (or its ONNX export) artifact.

This is what ``POST /v1/predict`` calls: rows are checked against the training schema (a
missing/extra column, a wrong type, NaN that nothing imputes, an infinite value -> a
``ValueError`` naming the column, which the server answers with 400), the saved cleaning (and
feature) transforms are replayed, and the network gives probabilities. A pretrain/quantize
artifact runs in torch; an export artifact (``model.onnx``) runs in onnxruntime.

    >>> from dsk.tabular.predict import TablePredictor
    >>> predict = TablePredictor.load(".dsk/artifacts/pretrain/<id>")
    >>> predict([{"mean_radius": 14.2, ...}])
    {'classes': [0, 1], 'labels': [1], 'probabilities': [[0.03, 0.97]]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsk.errors import DskError
from dsk.tabular.preprocess import TableSpec, check_frame, model_inputs, rows_to_frame


class TablePredictor:
    def __init__(self, spec: TableSpec, *, model: Any = None, onnx_path: Path | None = None):
        self.spec = spec
        self.model = model
        self.onnx_path = onnx_path
        self._session = None

    @classmethod
    def load(cls, path: str | Path) -> "TablePredictor":
        root = Path(path)
        if (root / "model.safetensors").is_file():
            from dsk.tabular.io import load_table_model

            model, spec = load_table_model(root)
            return cls(spec, model=model)
        if (root / "model.onnx").is_file():
            return cls(TableSpec.load(root), onnx_path=root / "model.onnx")
        raise DskError(f"{str(root)!r} holds no table model (model.safetensors or model.onnx)")

    @property
    def classes(self) -> list[Any]:
        return self.spec.classes

    def predict_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities [N, n_classes] for a frame already passed through :func:`check_frame`."""
        if self.onnx_path is not None:
            from dsk.tabular.export import onnx_inputs

            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
            return self._session.run(["probabilities"], onnx_inputs(frame, self.spec))[0]
        from dsk.tabular.io import predict_proba

        x_num, x_cat = model_inputs(frame, self.spec)
        return predict_proba(self.model, x_num, x_cat)

    def predict_csv_frame(self, frame: pd.DataFrame, *, label_ok: bool = True) -> np.ndarray:
        return self.predict_frame(check_frame(frame, self.spec, label_ok=label_ok))

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """JSON rows -> {"classes", "labels" (most probable class per row), "probabilities"}."""
        frame = rows_to_frame(rows, self.spec)
        proba = self.predict_frame(frame)
        return {
            "object": "prediction",
            "classes": self.classes,
            "labels": [self.classes[i] for i in proba.argmax(axis=1)],
            "probabilities": [[round(float(p), 6) for p in row] for row in proba],
        }
