"""Language-model metrics on a featurize `tokens` artifact: validation loss, perplexity, bits per byte.

Also: finding that artifact through a model's lineage, and measuring greedy decode tokens/s.

    >>> from dsk.evaluation.lm import evaluate_lm, find_tokens_artifact
    >>> tokens = find_tokens_artifact(store, model_artifact)
    >>> evaluate_lm(model, tokens.path, max_batches=16)
    {'val_loss': 1.52, 'perplexity': 4.57, 'bpb': 1.98, 'tokens': 32768}

The model may be a dsk ``Transformer`` or any callable mapping ids [B, T] to logits [B, T, V]
(or to an object with ``.logits``), such as the onnxruntime wrapper.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsk.artifacts import Artifact, Store
from dsk.errors import DskError


def read_val_tokens(tokens_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The validation token ids (memory-mapped) and the artifact's meta.json."""
    root = Path(tokens_dir)
    meta_path, val_path = root / "meta.json", root / "val.bin"
    if not meta_path.is_file() or not val_path.is_file():
        raise DskError(f"{str(root)!r} is not a tokens artifact (needs meta.json and val.bin); run `dsk featurize`")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if val_path.stat().st_size == 0:
        raise DskError(f"{str(root)!r} has no validation tokens; rerun `dsk featurize` with --val-fraction > 0")
    return np.memmap(val_path, dtype=dtype, mode="r"), meta


def val_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int | None):
    """Non-overlapping windows of seq_len+1 tokens from the start, grouped into batches (deterministic)."""
    import torch

    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DskError(f"validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = []
        for w in range(b * batch_size, min((b + 1) * batch_size, n_windows)):
            rows.append(np.asarray(tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64))
        chunk = torch.from_numpy(np.stack(rows))
        yield chunk[:, :-1], chunk[:, 1:]


def _logits(model: Any, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def evaluate_lm(
    model: Any,
    tokens_artifact_dir: str | Path,
    max_batches: int | None = None,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy on the validation split -> val_loss, perplexity, bpb.

    bpb (bits per UTF-8 byte) = val_loss * n_val_tokens / (ln 2 * val_bytes): the loss per token
    scaled to the whole split's token/byte ratio, comparable across tokenizers.
    """
    import torch
    import torch.nn.functional as F

    tokens, meta = read_val_tokens(tokens_artifact_dir)
    cfg = getattr(model, "cfg", None)
    seq_len = seq_len or min(getattr(cfg, "max_seq_len", getattr(model, "max_seq_len", 256)), 256)
    seq_len = min(seq_len, max(1, len(tokens) - 1))
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None and int(meta.get("vocab_size", 0)) > vocab:
        raise DskError(
            f"the tokens artifact has vocab_size={meta.get('vocab_size')} but the model only {vocab}; "
            "evaluate on the tokens the model was trained on"
        )
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in val_batches(tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches):
            logits = _logits(model, x).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total += float(loss)
            count += y.numel()
    if was_training and hasattr(model, "train"):
        model.train()
    val_loss = total / count
    n_val_tokens = int(meta.get("n_val_tokens") or len(tokens))
    val_bytes = int(meta.get("val_bytes") or 0)
    bpb = val_loss * n_val_tokens / (math.log(2) * val_bytes) if val_bytes else float("nan")
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "bpb": bpb, "tokens": count}


def find_tokens_artifact(store: Store, artifact: Artifact) -> Artifact | None:
    """The nearest `tokens` artifact (featurize output) among ``artifact``'s inputs, breadth first."""
    return store.nearest_ancestor(artifact, {"tokens"}, include_self=False)


def decode_tokens_per_s(
    step: Callable[[Any, int], Any],
    prefill: Callable[[Any], Any],
    prompt,
    new_tokens: int,
    *,
    warmup: int = 4,
    repeats: int = 3,
) -> float:
    """Greedy decode speed (tokens/s after the prompt), best of ``repeats``.

    ``prefill(prompt) -> (logits [1, V], state)`` and ``step(state, token) -> (logits, state)``
    abstract over torch and onnxruntime so both are timed by the same loop.
    """
    best = float("inf")
    for r in range(repeats + 1):
        logits, state = prefill(prompt)
        n = warmup if r == 0 else new_tokens
        start = time.perf_counter()
        for _ in range(n):
            token = int(logits.argmax())
            logits, state = step(state, token)
        elapsed = time.perf_counter() - start
        if r > 0:
            best = min(best, elapsed)
    return new_tokens / best


def torch_decode_tokens_per_s(model, prompt_ids, new_tokens: int = 64, *, repeats: int = 3) -> float:
    """Greedy decode tokens/s of a dsk Transformer with its KV cache, batch 1."""
    import torch

    max_len = min(model.cfg.max_seq_len, prompt_ids.shape[1] + new_tokens + 8)

    def prefill(prompt):
        cache = model.new_cache(1, max_len)
        logits = model(prompt, cache=cache, start_pos=0).logits[0, -1]
        return logits, (cache, prompt.shape[1])

    def step(state, token):
        cache, pos = state
        logits = model(torch.tensor([[token]]), cache=cache, start_pos=pos).logits[0, -1]
        return logits, (cache, pos + 1)

    model.eval()
    with torch.inference_mode():
        return decode_tokens_per_s(step, prefill, prompt_ids, new_tokens, repeats=repeats)


def decode_speeds(model, graphs: dict[str, Path], new_tokens: int, *, seed: int = 0) -> dict[str, float]:
    """Greedy batch-1 decode tokens/s: torch eager fp32 and each ONNX graph, same threads, same prompt."""
    import torch

    from dsk.models.onnx_runtime import OnnxLM

    threads = torch.get_num_threads()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
    n = max(1, min(new_tokens, model.cfg.max_seq_len - 16 - 8))
    out = {"torch_fp32_decode_tokens_per_s": torch_decode_tokens_per_s(model, prompt, n), "threads": threads}
    for name, directory in graphs.items():
        lm = OnnxLM(directory, threads=threads)
        out[f"{name}_decode_tokens_per_s"] = decode_tokens_per_s(
            lambda past, tok: lm.step(np.array([tok]), past), lambda ids: lm.prefill(ids.numpy()), prompt, n
        )
    return out
