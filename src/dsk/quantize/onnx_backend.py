"""`dsk quantize --backend onnx`: onnxruntime int8 quantization of the exported decoder graph.

``--scheme dynamic`` uses onnxruntime's dynamic quantization (int8 per-channel weights,
activations quantized per call: MatMulInteger / DynamicQuantizeMatMul); ``--scheme static``
writes a QDQ graph whose uint8 activation ranges are calibrated on validation prompts. Only
matmuls against constant weights are quantized; attention's activation x activation matmuls,
the router and the norms stay fp32.

    $ dsk quantize --bits 8 --backend onnx --scheme dynamic

The artifact has the layout of `dsk export --format onnx` (model.onnx, onnx.json, config.json,
tokenizer.json), so `dsk.models.onnx_runtime.OnnxLM` and the server load it the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact
from dsk.errors import DskError
from dsk.runtime import StageContext

SCHEMES = ("dynamic", "static")


def _check(ctx: StageContext) -> None:
    p = ctx.params
    if p.bits != 8:
        raise DskError(f"--backend onnx supports --bits 8 only (onnxruntime int8), not {p.bits}; use --backend torch for 16/4 bits")
    if p.scheme not in SCHEMES:
        raise DskError(f"--backend onnx supports --scheme {' or '.join(SCHEMES)}, not {p.scheme!r}")
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise DskError("onnxruntime is not installed; `pip install onnxruntime`, or use --backend torch") from None


class _Calibration:
    """onnxruntime CalibrationDataReader over validation windows (prefill with an empty cache)."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - newer onnxruntime calls it between passes
        pass


def build_onnx(ctx: StageContext, art: Artifact) -> None:
    _check(ctx)
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from dsk.evaluation.lm import evaluate_lm, read_val_tokens, val_batches
    from dsk.evaluation.lm import decode_speeds
    from dsk.models import load_model
    from dsk.models.onnx_export import export_onnx, write_layout
    from dsk.models.onnx_runtime import OnnxLM
    from dsk.quantize.build import parent_config, pct_change, tokens_for

    p = ctx.params
    data = parent_config(art)
    if "quantization" in data:
        raise DskError(f"{art.stage}:{art.id} is already torch-quantized; --backend onnx needs the float model")
    if (art.path / "model.onnx").is_file():
        raise DskError(f"{art.stage}:{art.id} is an ONNX graph; pass the float model artifact it came from")
    tokens = tokens_for(ctx, art)
    model, _, cfg = load_model(art.path)
    with tempfile.TemporaryDirectory(prefix="dsk-onnx-fp32-") as tmp:
        fp32_dir = Path(tmp)
        layout = export_onnx(model, fp32_dir / "model.onnx")
        write_layout(layout, fp32_dir)
        ctx.log.info(f"exported the fp32 graph; quantizing with onnxruntime ({p.scheme})")
        out_graph = ctx.out / "model.onnx"
        # the router (a Gemm) and, unless --quantize-head, the LM head stay fp32 as in the torch backend
        keep_float = [] if p.quantize_head else _lm_head_nodes(fp32_dir / "model.onnx")
        if p.scheme == "dynamic":
            quantize_dynamic(str(fp32_dir / "model.onnx"), str(out_graph), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_float)
        else:
            val, _ = read_val_tokens(tokens.path)
            tail = val[len(val) // 2 :]
            seq = min(cfg.max_seq_len, 128, len(tail) - 1)
            empty = [np.zeros((1, 0, *s), dtype=np.float32) for s in layout["past_shapes"]]
            feeds = []
            for x, _ in val_batches(tail, seq_len=seq, batch_size=1, max_batches=p.calib_batches * p.eval_batch_size):
                feeds.append({"input_ids": x.numpy(), **dict(zip(layout["past_inputs"], empty))})
            reader = type("Reader", (_Calibration, CalibrationDataReader), {})(feeds)
            # weights only: matmuls with a constant operand; activation x activation stays fp32
            quantize_static(str(fp32_dir / "model.onnx"), str(out_graph), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["MatMul"],
                            nodes_to_exclude=_activation_matmuls(fp32_dir / "model.onnx") + keep_float)
            ctx.log.info(f"calibrated activation ranges on {len(feeds)} validation windows of {seq} tokens")
        layout["quantization"] = {"bits": 8, "scheme": p.scheme, "engine": "onnxruntime",
                                  "format": "QOperator" if p.scheme == "dynamic" else "QDQ"}
        write_layout(layout, ctx.out)
        shutil.copyfile(art.path / "config.json", ctx.out / "config.json")
        if (art.path / "tokenizer.json").is_file():
            shutil.copyfile(art.path / "tokenizer.json", ctx.out / "tokenizer.json")

        fp32_lm, int8_lm = OnnxLM(fp32_dir), OnnxLM(ctx.out)
        kw = dict(batch_size=p.eval_batch_size, seq_len=min(cfg.max_seq_len, 256))
        torch_eval = evaluate_lm(model, tokens.path, p.eval_batches, **kw)
        fp32_eval = evaluate_lm(fp32_lm, tokens.path, p.eval_batches, **kw)
        int8_eval = evaluate_lm(int8_lm, tokens.path, p.eval_batches, **kw)
        size = out_graph.stat().st_size
        fp32_size = (fp32_dir / "model.onnx").stat().st_size
        m: dict[str, Any] = {
            "bits": 8, "scheme": p.scheme, "backend": "onnx", "group_size": None,
            "size_bytes": size, "fp32_bytes": fp32_size, "size_ratio_fp32": size / fp32_size,
            "val_loss": int8_eval["val_loss"], "perplexity": int8_eval["perplexity"], "bpb": int8_eval["bpb"],
            "parent_val_loss": torch_eval["val_loss"], "parent_perplexity": torch_eval["perplexity"],
            "parent_bpb": torch_eval["bpb"], "ort_fp32_perplexity": fp32_eval["perplexity"],
            "perplexity_change_pct": pct_change(int8_eval["perplexity"], torch_eval["perplexity"]),
            "bpb_change": int8_eval["bpb"] - torch_eval["bpb"],
            "eval_tokens": int8_eval["tokens"], "tokens_artifact": tokens.id,
        }
        if p.bench_tokens:
            speeds = decode_speeds(model, {"ort_fp32": fp32_dir, "ort_int8": ctx.out}, p.bench_tokens, seed=ctx.seed)
            m.update(speeds)
            m["decode_tokens_per_s"] = speeds["ort_int8_decode_tokens_per_s"]
            m["ort_int8_speedup_vs_torch_fp32"] = (
                speeds["ort_int8_decode_tokens_per_s"] / speeds["torch_fp32_decode_tokens_per_s"]
            )
    ctx.kind = "export"
    ctx.metrics = m
    ctx.key_metric = "perplexity_change_pct"
    ctx.log.info(
        f"int8 graph {size / 1e6:.2f} MB ({m['size_ratio_fp32']:.3f}x fp32 graph); perplexity "
        f"{torch_eval['perplexity']:.3f} (torch) -> {int8_eval['perplexity']:.3f} ({m['perplexity_change_pct']:+.2f}%)"
        + (f"; decode tok/s torch fp32 {m['torch_fp32_decode_tokens_per_s']:.1f}, ORT fp32 "
           f"{m['ort_fp32_decode_tokens_per_s']:.1f}, ORT int8 {m['ort_int8_decode_tokens_per_s']:.1f}"
           if p.bench_tokens else "")
    )


def _lm_head_nodes(path: Path) -> list[str]:
    """The MatMul that produces the logits."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "logits" in n.output]


def _activation_matmuls(path: Path) -> list[str]:
    """Names of MatMul nodes whose inputs are both computed (attention scores and mixing)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
