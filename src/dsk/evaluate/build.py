"""Builds an `eval` artifact: metrics.json plus samples / task predictions / calibration plot.

Language models are scored with :func:`dsk.evaluation.lm.evaluate_lm` — the same function
quantize and export use for their own numbers — so every variant is measured the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact
from dsk.errors import DskError
from dsk.runtime import StageContext


def _lm_model(art: Artifact, threads: int):
    """A callable ids -> logits plus a greedy generate(prompt_ids, n) for a model or ONNX export."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    if art.kind == "export":
        from dsk.models.onnx_runtime import OnnxLM

        lm = OnnxLM(art.path, threads=threads or None)

        def generate(ids: list[int], n: int, eos: int | None) -> list[int]:
            out = lm.generate(np.asarray([ids], dtype=np.int64), n, temperature=0.0)
            new = [int(t) for t in np.asarray(out)[0, len(ids):]]
            return new[: new.index(eos)] if eos is not None and eos in new else new

        return lm, generate, lm.max_seq_len
    from dsk.models import load_model

    model, _, cfg = load_model(art.path)

    def generate(ids: list[int], n: int, eos: int | None) -> list[int]:
        n = max(0, min(n, cfg.max_seq_len - len(ids)))
        if n == 0:
            return []
        out = model.generate(torch.tensor([ids]), n, temperature=0.0, eos_id=eos)[0, len(ids):].tolist()
        return out[: out.index(eos)] if eos is not None and eos in out else out

    return model, generate, cfg.max_seq_len


def _build_lm(ctx: StageContext, art: Artifact) -> None:
    from dsk.data.tokenizer import load_tokenizer
    from dsk.evaluation.lm import evaluate_lm, find_tokens_artifact

    p = ctx.params
    tokens = find_tokens_artifact(ctx.store, art)
    if tokens is None:
        raise DskError(f"{art.stage}:{art.id} has no featurize `tokens` artifact in its lineage; "
                       "evaluation needs its validation shards")
    model, generate, max_len = _lm_model(art, p.threads)
    ctx.log.info(f"scoring {art.stage}:{art.id} on the validation shards of featurize:{tokens.id}")
    metrics: dict[str, Any] = dict(evaluate_lm(model, tokens.path, max_batches=p.max_batches, seq_len=min(256, max_len)))
    metrics["tokens_artifact"] = tokens.id

    tok = load_tokenizer(art.path if (art.path / "tokenizer.json").is_file() else tokens.path)
    eos = tok.special_tokens.get("<|endoftext|>") if hasattr(tok, "special_tokens") else None
    samples = []
    for prompt in p.prompts:
        ids = tok.encode(prompt)[: max_len - 1]
        new = generate(ids, p.max_new_tokens, eos)
        samples.append({"prompt": prompt, "completion": tok.decode(new), "tokens": len(new)})
    (ctx.out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    if p.tasks and p.task_examples and art.kind == "model":
        from dsk.data.chat import read_jsonl
        from dsk.evaluation.tasks import exact_match, is_exact
        from dsk.models import load_model

        records, _ = read_jsonl(Path(p.tasks), kind="instruction", bad_lines="skip")
        records = records[: p.task_examples]
        model_t, _, _ = load_model(art.path)
        accuracy, preds = exact_match(model_t, tok, records, max_new_tokens=p.max_new_tokens)
        metrics["exact_match"] = accuracy
        metrics["exact_match_examples"] = len(records)
        (ctx.out / "task_predictions.jsonl").write_text("".join(
            json.dumps({"prompt": r.prompt_messages[-1]["content"], "answer": r.answer, "prediction": pr,
                        "correct": is_exact(pr, r.answer)}, ensure_ascii=False) + "\n"
            for r, pr in zip(records, preds)))
        ctx.log.info(f"exact match on {len(records)} held-out tasks: {accuracy:.3f}")
    ctx.kind = "eval"
    ctx.metrics = metrics
    ctx.key_metric = "bpb"
    ctx.log.info(f"val_loss {metrics['val_loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
                 f"bits/byte {metrics['bpb']:.4f}")


def _build_table(ctx: StageContext, art: Artifact) -> None:
    from dsk.tabular.evaluate import evaluate_table, table_metrics

    p = ctx.params
    plot = ctx.out / "calibration.png"
    if p.data:
        metrics = evaluate_table(art.path, p.data, plot=plot)
    else:
        from dsk.tabular.evaluate import plot_calibration
        from dsk.tabular.io import load_table_model, predict_proba
        from dsk.tabular.quantize import validation_rows

        model_dir = art.path
        if art.kind == "table-onnx":
            parent = ctx.store.find_by_id(art.input_ids[0]) if art.input_ids else None
            if parent is None:
                raise DskError("this ONNX table export's source model is gone; pass --data with a labelled CSV")
            model_dir = parent.path
        model, spec = load_table_model(model_dir)
        rows = validation_rows(ctx.store, spec.meta)
        if rows is None:
            raise DskError("the model's training data is no longer in the store; pass --data with a labelled CSV")
        x_num, x_cat, y = rows
        metrics = table_metrics(y, predict_proba(model, x_num, x_cat))
        plot_calibration(metrics["calibration"], plot)
    ctx.kind = "eval"
    ctx.metrics = {k: v for k, v in metrics.items() if k != "calibration"}
    (ctx.out / "calibration.json").write_text(json.dumps(metrics.get("calibration", {}), indent=2))
    ctx.key_metric = "roc_auc"
    ctx.log.info(f"ROC-AUC {metrics.get('roc_auc', float('nan')):.4f}, accuracy {metrics.get('accuracy', float('nan')):.4f}")


def build(ctx: StageContext) -> None:
    art = ctx.input
    assert isinstance(art, Artifact)
    if art.kind in ("table-model", "table-onnx"):
        _build_table(ctx, art)
    else:
        _build_lm(ctx, art)
