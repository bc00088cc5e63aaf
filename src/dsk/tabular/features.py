"""The featurize stage's fitted table transform, for a table model: numpy replay and torch ops.

`dsk featurize` saves its fitted steps (``dsk.data.table_features``): encode (numeric fill,
one-hot of text columns), crosses (products, safe ratios, ANDs), UMAP, and the selected
columns. The numpy replay is that module's own :func:`apply_transform`; this module adds the
same steps as an ``nn.Module`` so the ONNX graph of a table model takes raw rows:

* encode: the median fill is a ``where``; a text column arrives as codes (1-based index of
  the value in the column's training categories, 0 = unseen) and becomes its one-hot
  columns by comparison with ``1..K`` — the same zeros an unseen value gets in numpy;
* crosses: elementwise products and ``a / (|b| + 1)``;
* UMAP: featurize does not run ``umap.UMAP.transform`` on new rows (it is neither safe to
  save nor exportable); it embeds a row as the inverse-distance-weighted mean of its ``k``
  nearest training rows' fitted embeddings (a training row maps to its own embedding). That
  is matrix arithmetic plus ``TopK`` and ``Gather``, so the graph computes it exactly as the
  numpy replay does, in float64. (Ties at the k-th nearest distance could pick a different
  neighbour than numpy's stable sort; with continuous features this does not occur in
  practice, and the export check would catch it.)
* selection: an index of the kept columns.

    >>> t = load_feature_transform(".dsk/artifacts/pretrain/<id>/feature_transform")
    >>> features = apply_features(clean_frame, t)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from dsk.data.table_features import RATIO_EPS, TableTransform, apply_transform, load_transform, one_hot_name, umap_columns


def load_feature_transform(path: str | Path) -> TableTransform:
    return load_transform(path)


def apply_features(clean: pd.DataFrame, transform: TableTransform) -> pd.DataFrame:
    """Cleaned rows -> the selected feature columns (the numpy reference)."""
    return apply_transform(transform, clean)


def categorical_vocab(transform: TableTransform) -> dict[str, list[str]]:
    """Text input columns -> their training categories (code = index + 1)."""
    return {c["name"]: list(c["categories"]) for c in transform.spec["inputs"] if c["type"] != "numeric"}


def make_feature_module(transform: TableTransform, spec: Any):
    """An ``nn.Module``: (cleaned raw numeric float64 [N, n] in ``spec.raw_numeric`` order,
    categorical codes int64 [N, c] in :func:`categorical_vocab` order) -> features float64 [N, F]."""
    import torch
    import torch.nn as nn

    tspec, arrays = transform.spec, transform.arrays
    raw_numeric = list(spec.raw_numeric)
    vocab = categorical_vocab(transform)
    cat_order = list(vocab)

    class FeatureTransform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            f64 = torch.float64
            self.encode_plan: list[tuple[str, str, Any]] = []  # (name, "num"|"cat", index/(pos, code))
            fills = []
            for col in tspec["inputs"]:
                if col["type"] == "numeric":
                    if col["name"] not in raw_numeric:
                        raise ValueError(f"feature input {col['name']!r} is not a numeric column of the table")
                    self.encode_plan.append((col["name"], "num", (raw_numeric.index(col["name"]), len(fills))))
                    fills.append(float(col["fill"]))
                else:
                    pos = cat_order.index(col["name"])
                    for k, category in enumerate(col["categories"]):
                        self.encode_plan.append((one_hot_name(col["name"], category), "cat", (pos, k + 1)))
            self.register_buffer("fill", torch.tensor(fills, dtype=f64))
            self.crosses = [(c["name"], c["op"], c["a"], c["b"]) for c in tspec.get("crosses", [])]
            self.umap = tspec.get("umap") or None
            if self.umap:
                for key in ("umap_mean", "umap_scale", "umap_train_x", "umap_train_embedding"):
                    self.register_buffer(key, torch.as_tensor(arrays[key], dtype=f64))
                tx = torch.as_tensor(arrays["umap_train_x"], dtype=f64)
                self.register_buffer("umap_train_sq", (tx * tx).sum(dim=1))
                self.k = max(1, min(int(self.umap["k"]), tx.shape[0]))
            self.selected = list(tspec["selected"])

        def forward(self, x, codes=None):
            cols: dict[str, Any] = {}
            for name, kind, where in self.encode_plan:
                if kind == "num":
                    j, f = where
                    v = x[:, j]
                    cols[name] = torch.where(torch.isnan(v), self.fill[f], v)
                else:
                    pos, code = where
                    cols[name] = (codes[:, pos] == code).to(x.dtype)
            for name, op, a, b in self.crosses:
                cols[name] = cols[a] * cols[b] if op in ("product", "and") else cols[a] / (cols[b].abs() + RATIO_EPS)
            if self.umap:
                emb = self._umap(torch.stack([cols[c] for c in self.umap["input_columns"]], dim=1))
                if self.umap["mode"] == "replace":
                    cols = {}
                for i, name in enumerate(umap_columns(emb.shape[1])):
                    cols[name] = emb[:, i]
            return torch.stack([cols[c] for c in self.selected], dim=1)

        def _umap(self, inputs):
            z = (inputs - self.umap_mean) / self.umap_scale
            tx, temb = self.umap_train_x, self.umap_train_embedding
            k = self.k
            d2 = (z * z).sum(dim=1, keepdim=True) + self.umap_train_sq - 2.0 * z @ tx.T
            nn_idx = torch.topk(torch.clamp(d2, min=0.0), k, dim=1, largest=False).indices  # [N, k]
            flat = nn_idx.reshape(-1)
            neighbours = tx.index_select(0, flat).reshape(nn_idx.shape[0], k, tx.shape[1])
            dist = torch.sqrt(((z.unsqueeze(1) - neighbours) ** 2).sum(dim=2))  # exact, as numpy recomputes
            emb = temb.index_select(0, flat).reshape(nn_idx.shape[0], k, temb.shape[1])
            exact = dist == 0.0
            inv = 1.0 / torch.where(exact, torch.ones_like(dist), dist)
            w = torch.where(exact.any(dim=1, keepdim=True), exact.to(dist.dtype), inv)
            return (w.unsqueeze(-1) * emb).sum(dim=1) / w.sum(dim=1, keepdim=True)

    return FeatureTransform()
