"""The work of `dsk export`: write the chosen format, verify it against torch, record the result.

    $ dsk export --format onnx
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact
from dsk.errors import DskError
from dsk.evaluation.lm import decode_speeds
from dsk.runtime import StageContext

FORMATS = ("onnx", "hf", "safetensors")


def model_artifact(ctx: StageContext) -> tuple[Artifact, dict[str, Any]]:
    art = ctx.input
    if not isinstance(art, Artifact):
        raise DskError("export reads a model artifact, not a raw path; run `dsk pretrain` first or pass an artifact id")
    if (art.path / "model.onnx").is_file():
        raise DskError(f"{art.stage}:{art.id} is already an ONNX graph; export its source model artifact instead")
    cfg_path = art.path / "config.json"
    if not cfg_path.is_file() or not (art.path / "model.safetensors").is_file():
        raise DskError(
            f"{art.stage}:{art.id} (kind {art.kind or '?'!r}) is not a language-model artifact; "
            f"export supports dsk language models in formats {', '.join(FORMATS)}"
        )
    data = json.loads(cfg_path.read_text())
    if data.get("model_type") not in (None, "dsk-deepseek"):
        raise DskError(
            f"{art.stage}:{art.id} holds a {data.get('model_type')!r} model; export supports dsk language "
            "models only (table classifiers are exported by the table track)"
        )
    return art, data


def copy_if_exists(src: Path, dst: Path) -> None:
    if src.is_file():
        shutil.copyfile(src, dst)


def build(ctx: StageContext) -> None:
    p = ctx.params
    art, data = model_artifact(ctx)
    ctx.kind = "export"
    if p.threads:
        import torch

        torch.set_num_threads(p.threads)
    if p.format == "safetensors":
        return build_safetensors(ctx, art, data)
    if "quantization" in data:
        q = data["quantization"]
        raise DskError(
            f"{art.stage}:{art.id} is a {q.get('bits')}-bit torch-quantized model; --format {p.format} needs a float "
            "model: export its parent (for int8 ONNX: `dsk quantize --bits 8 --backend onnx`), or use --format safetensors"
        )
    if p.format == "hf":
        return build_hf(ctx, art)
    return build_onnx(ctx, art)


def build_safetensors(ctx: StageContext, art: Artifact, data: dict[str, Any]) -> None:
    shutil.copyfile(art.path / "model.safetensors", ctx.out / "model.safetensors")
    shutil.copyfile(art.path / "config.json", ctx.out / "config.json")
    ctx.metrics = {"format": "safetensors", "size_bytes": (ctx.out / "model.safetensors").stat().st_size,
                   "quantized": "quantization" in data}
    ctx.key_metric = "size_bytes"
    ctx.log.info(f"wrote weights + config ({ctx.metrics['size_bytes'] / 1e6:.2f} MB)")


def build_hf(ctx: StageContext, art: Artifact) -> None:
    from dsk.models import load_model
    from dsk.models.hf import compare_with_transformers, hf_architecture, save_hf

    model, _, cfg = load_model(art.path)
    hf_architecture(cfg)  # fails early, before anything is written, when no class fits
    info = save_hf(model, ctx.out, tokenizer_path=art.path / "tokenizer.json")
    if not (ctx.out / "tokenizer.json").is_file():
        ctx.log.warning("the model artifact has no tokenizer.json; the hf directory has none either")
    diff = compare_with_transformers(model, ctx.out, seed=ctx.seed)
    ctx.metrics = {"format": "hf", **info, "transformers_max_abs_logit_diff": diff,
                   "size_bytes": (ctx.out / "model.safetensors").stat().st_size}
    if diff is not None and diff > max(ctx.params.tolerance, 1e-3):
        raise DskError(f"transformers' logits differ from dsk's by {diff:.2e}; the {info['architecture']} mapping is not exact")
    ctx.key_metric = "transformers_max_abs_logit_diff" if diff is not None else "size_bytes"
    ctx.log.info(
        f"wrote a {info['architecture']} checkpoint"
        + (f"; transformers matches dsk to {diff:.1e}" if diff is not None else " (transformers not installed: not compared)")
    )


def build_onnx(ctx: StageContext, art: Artifact) -> None:
    from dsk.models import load_model
    from dsk.models.onnx_export import export_onnx, verify_onnx, write_layout

    p = ctx.params
    model, _, cfg = load_model(art.path)
    layout = export_onnx(model, ctx.out / "model.onnx", opset=p.opset)
    write_layout(layout, ctx.out)
    copy_if_exists(art.path / "config.json", ctx.out / "config.json")
    copy_if_exists(art.path / "tokenizer.json", ctx.out / "tokenizer.json")
    ctx.log.info(f"exported {cfg.n_layers}-layer {cfg.attn} decoder to ONNX (opset {p.opset}); verifying in onnxruntime")
    check = verify_onnx(model, ctx.out, seed=ctx.seed, n_prompts=p.verify_prompts, new_tokens=p.verify_tokens)
    worst = max(check["max_abs_logit_diff"], check["max_abs_logit_diff_cached"])
    if worst > p.tolerance or not check["greedy_tokens_identical"]:
        raise DskError(
            f"ONNX export failed verification (max |logit diff| {worst:.2e} vs tolerance {p.tolerance:g}, "
            f"greedy tokens identical: {check['greedy_tokens_identical']}); no artifact written"
        )
    m: dict[str, Any] = {"format": "onnx", "opset": p.opset, **check,
                         "size_bytes": (ctx.out / "model.onnx").stat().st_size}
    if p.bench_tokens:
        m.update(decode_speeds(model, {"ort_fp32": ctx.out}, p.bench_tokens, seed=ctx.seed))
    ctx.metrics = m
    ctx.key_metric = "max_abs_logit_diff"
    ctx.log.info(
        f"verified: max |logit diff| {check['max_abs_logit_diff']:.1e} (cached steps {check['max_abs_logit_diff_cached']:.1e}), "
        f"{check['greedy_tokens']} greedy tokens identical"
        + (f"; decode {m['ort_fp32_decode_tokens_per_s']:.1f} tok/s onnxruntime vs {m['torch_fp32_decode_tokens_per_s']:.1f} torch"
           if p.bench_tokens else "")
    )
