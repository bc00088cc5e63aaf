"""The work of `dsk quantize`: quantize, save, reload, evaluate against the parent, time decoding.

    $ dsk quantize --bits 4 --group-size 64
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from dsk import console
from dsk.artifacts import Artifact
from dsk.errors import DskError
from dsk.runtime import StageContext

MODEL_FILES = ("model.safetensors", "config.json")


def input_model_artifact(ctx: StageContext) -> Artifact:
    art = ctx.input
    if not isinstance(art, Artifact):
        raise DskError("quantize reads a model artifact, not a raw path; run `dsk pretrain` first or pass an artifact id")
    return art


def parent_config(art: Artifact) -> dict[str, Any]:
    path = art.path / "config.json"
    if not path.is_file():
        raise DskError(
            f"{art.stage} artifact {art.id} is not a model (kind {art.kind or '?'!r}); "
            "quantize takes a pretrain/finetune model artifact (or an ONNX export with --backend onnx)"
        )
    return json.loads(path.read_text())


def tokens_for(ctx: StageContext, art: Artifact) -> Artifact:
    from dsk.evaluation.lm import find_tokens_artifact

    tokens = find_tokens_artifact(ctx.store, art)
    if tokens is None:
        raise DskError(
            f"no featurize `tokens` artifact in the lineage of {art.stage}:{art.id}; quantize evaluates on its "
            "validation shards, so quantize a model trained by `dsk pretrain`/`dsk finetune`"
        )
    return tokens


def fp32_bytes(model) -> int:
    from dsk.models import state_dict_for_save

    return sum(t.numel() * 4 for t in state_dict_for_save(model).values() if t.is_floating_point())


def pct_change(new: float, old: float) -> float:
    return 100.0 * (new - old) / old


def set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def build(ctx: StageContext) -> None:
    p = ctx.params
    art = input_model_artifact(ctx)
    set_threads(p.threads)
    if p.backend == "onnx":
        from dsk.quantize.onnx_backend import build_onnx

        return build_onnx(ctx, art)
    if (art.path / "model.onnx").is_file():
        raise DskError(f"{art.stage}:{art.id} is an ONNX graph; quantize it with --backend onnx")
    data = parent_config(art)
    if "quantization" in data:
        q = data["quantization"]
        raise DskError(
            f"{art.stage}:{art.id} is already quantized ({q.get('bits')}-bit {q.get('scheme')}); "
            "quantize its unquantized parent instead"
        )
    tokens = tokens_for(ctx, art)

    import torch

    from dsk.evaluation.lm import evaluate_lm, read_val_tokens, torch_decode_tokens_per_s, val_batches
    from dsk.models import load_model, save_model
    from dsk.models.quant import calibrate, quantize_model

    torch.manual_seed(ctx.seed)
    parent, tokenizer, cfg = load_model(art.path)
    group_size = p.group_size if p.bits == 4 else None
    scheme_name = f"int{p.bits}" if p.bits != 16 else p.float_dtype
    ctx.log.info(
        f"quantizing {art.stage}:{art.id} ({parent.num_params():,} params) to {scheme_name} {p.scheme}"
        + (f" g{group_size}" if group_size else "")
    )
    qmodel = quantize_model(parent, bits=p.bits, scheme=p.scheme, group_size=group_size,
                            float_dtype=p.float_dtype, quantize_head=p.quantize_head)
    if p.scheme == "static":
        val, _ = read_val_tokens(tokens.path)
        # calibrate on the tail of the validation split; evaluation reads it from the start
        tail = val[len(val) // 2 :]
        seq_len = min(cfg.max_seq_len, 256)
        batches = (x for x, _ in val_batches(tail, seq_len=min(seq_len, len(tail) - 1),
                                             batch_size=p.eval_batch_size, max_batches=p.calib_batches))
        seen = calibrate(qmodel, batches)
        ctx.log.info(f"calibrated activation ranges on {seen:,} validation tokens")

    save_model(qmodel, ctx.out)
    if (art.path / "tokenizer.json").is_file():
        shutil.copyfile(art.path / "tokenizer.json", ctx.out / "tokenizer.json")
    # evaluate exactly what was written: reload it the way every consumer will
    reloaded, _, _ = load_model(ctx.out)

    with console.progress_task("evaluating parent and quantized model", total=2) as advance:
        before = evaluate_lm(parent, tokens.path, p.eval_batches, batch_size=p.eval_batch_size)
        advance(1)
        after = evaluate_lm(reloaded, tokens.path, p.eval_batches, batch_size=p.eval_batch_size)
        advance(1)

    size = (ctx.out / "model.safetensors").stat().st_size
    fp32 = fp32_bytes(parent)
    m: dict[str, Any] = {
        "bits": p.bits,
        "scheme": p.scheme if p.bits != 16 else p.float_dtype,
        "group_size": group_size,
        "backend": "torch",
        "quantized_head": p.quantize_head,
        "size_bytes": size,
        "parent_size_bytes": (art.path / "model.safetensors").stat().st_size,
        "fp32_bytes": fp32,
        "size_ratio_fp32": size / fp32,
        "val_loss": after["val_loss"],
        "perplexity": after["perplexity"],
        "bpb": after["bpb"],
        "parent_val_loss": before["val_loss"],
        "parent_perplexity": before["perplexity"],
        "parent_bpb": before["bpb"],
        "perplexity_change_pct": pct_change(after["perplexity"], before["perplexity"]),
        "bpb_change": after["bpb"] - before["bpb"],
        "eval_tokens": after["tokens"],
        "tokens_artifact": tokens.id,
    }
    if p.bench_tokens:
        val, _ = read_val_tokens(tokens.path)
        prompt = torch.from_numpy(val[:16].astype("int64"))[None]
        n = max(1, min(p.bench_tokens, cfg.max_seq_len - prompt.shape[1] - 8))
        m["decode_tokens_per_s"] = torch_decode_tokens_per_s(reloaded, prompt, n)
        m["parent_decode_tokens_per_s"] = torch_decode_tokens_per_s(parent, prompt, n)
        m["decode_speedup"] = m["decode_tokens_per_s"] / m["parent_decode_tokens_per_s"]
        m["torch_threads"] = torch.get_num_threads()
    ctx.kind = "model"
    ctx.metrics = m
    ctx.key_metric = "perplexity_change_pct"
    ctx.log.info(
        f"size {size / 1e6:.2f} MB ({m['size_ratio_fp32']:.3f}x fp32); perplexity {before['perplexity']:.3f} -> "
        f"{after['perplexity']:.3f} ({m['perplexity_change_pct']:+.2f}%); bpb {before['bpb']:.4f} -> {after['bpb']:.4f}"
        + (f"; decode {m['decode_tokens_per_s']:.1f} tok/s (parent {m['parent_decode_tokens_per_s']:.1f})"
           if p.bench_tokens else "")
    )
