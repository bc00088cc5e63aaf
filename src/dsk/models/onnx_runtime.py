"""Run an exported dsk ONNX decoder in onnxruntime: prefill, cached decode steps, generation.

Loads the directory written by `dsk export --format onnx` (or `dsk quantize --backend onnx`):
``model.onnx`` + ``onnx.json`` (the graph's input/output layout) [+ ``tokenizer.json``].

    >>> from dsk.models.onnx_runtime import OnnxLM
    >>> lm = OnnxLM(".dsk/artifacts/export/<id>")
    >>> logits, past = lm.prefill(ids)               # ids: int64 [B, T] numpy
    >>> logits, past = lm.step(next_ids, past)       # next_ids [B, 1]
    >>> out = lm.generate(ids, max_new_tokens=32)    # greedy at temperature 0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dsk.errors import DskError


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DskError("onnxruntime is not installed; `pip install onnxruntime` (or use --format hf|safetensors)") from None
    return ort


class OnnxLM:
    """An onnxruntime session over the decoder graph and its KV-cache layout."""

    def __init__(self, directory: str | Path, *, threads: int | None = None):
        ort = _import_ort()
        root = Path(directory)
        graph, layout_path = root / "model.onnx", root / "onnx.json"
        if not graph.is_file() or not layout_path.is_file():
            raise DskError(f"{str(root)!r} is not an ONNX export (needs model.onnx and onnx.json); run `dsk export --format onnx`")
        self.layout: dict[str, Any] = json.loads(layout_path.read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.past_names: list[str] = self.layout["past_inputs"]
        self.past_shapes: list[list[int]] = self.layout["past_shapes"]
        self.output_names: list[str] = self.layout["outputs"]
        self.vocab_size: int = self.layout["vocab_size"]
        self.max_seq_len: int = self.layout["max_seq_len"]
        self.tokenizer = None
        if (root / "tokenizer.json").is_file():
            from dsk.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(root / "tokenizer.json")  # the same class load_model returns

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        return [np.zeros((batch_size, 0, *s), dtype=np.float32) for s in self.past_shapes]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """logits [B, T, V] and the grown cache for ``input_ids`` [B, T] after ``past``."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        past = past if past is not None else self.empty_past(ids.shape[0])
        total = ids.shape[1] + past[0].shape[1]
        if total > self.max_seq_len:
            raise DskError(f"sequence of {total} tokens exceeds the model's max_seq_len={self.max_seq_len}")
        feeds = {"input_ids": ids, **dict(zip(self.past_names, past))}
        out = self.session.run(self.output_names, feeds)
        return out[0], out[1:]

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the prompt; returns the last position's logits [B, V] and the cache."""
        logits, past = self.forward(input_ids)
        return logits[:, -1], past

    def step(self, next_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decode step for ``next_ids`` [B] or [B, 1]; returns logits [B, V] and the cache."""
        logits, past = self.forward(np.asarray(next_ids, dtype=np.int64).reshape(-1, 1), past)
        return logits[:, -1], past

    def __call__(self, idx):
        """torch ids [B, T] -> torch logits [B, T, V] (no cache), so `evaluate_lm` can score it."""
        import torch

        return torch.from_numpy(self.forward(idx.numpy())[0])

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 seed: int = 0, return_logits: bool = False):
        """Append ``max_new_tokens`` tokens to ``input_ids`` [B, T] using the KV cache."""
        import torch

        from dsk.models.model import sample_next

        gen = torch.Generator().manual_seed(seed)
        ids = np.asarray(input_ids, dtype=np.int64)
        logits, past = self.prefill(ids)
        seen, done = [], np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            seen.append(logits)
            nxt = sample_next(torch.from_numpy(logits).float(), temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=gen).numpy()
            if eos_id is not None:
                nxt = np.where(done, eos_id, nxt)
                done |= nxt == eos_id
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            if i + 1 == max_new_tokens or (eos_id is not None and done.all()):
                break
            logits, past = self.step(nxt, past)
        if return_logits:
            return ids, np.concatenate([s[:1] for s in seen], axis=0)
        return ids
