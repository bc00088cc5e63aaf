"""Parameters of `dsk quantize`.

    $ dsk quantize --bits 4 --group-size 64
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsk.config import StageParams


class Params(StageParams):
    bits: Literal[16, 8, 4] = Field(8, description="Weight bit width: 16 (fp16/bf16), 8 (int8 per-channel) or 4 (int4 group-wise).")
    scheme: Literal["weight-only", "dynamic", "static"] = Field(
        "weight-only",
        description="8-bit only: 'weight-only'; 'dynamic' adds int8 activations quantized at run time; "
        "'static' calibrates per-tensor uint8 activation ranges on validation data.",
    )
    group_size: Literal[16, 32, 64, 128] = Field(
        64, description="4-bit only: input channels sharing one scale and zero point (16 runs without the int4 kernel)."
    )
    float_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Storage dtype at --bits 16, and of the tensors kept in floating point (embeddings) otherwise."
    )
    quantize_head: bool = Field(False, description="Also quantize the LM head (embeddings, norms and the router always stay float).")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="'torch': a dsk model artifact; 'onnx': onnxruntime int8 quantization of the exported ONNX graph (--bits 8)."
    )
    eval_batches: int = Field(16, ge=1, le=10_000, description="Validation batches evaluated for the quantized model and its parent.")
    eval_batch_size: int = Field(8, ge=1, le=512, description="Sequences per validation batch.")
    calib_batches: int = Field(4, ge=1, le=1000, description="Static scheme: validation batches used to calibrate activation ranges.")
    bench_tokens: int = Field(32, ge=0, le=4096, description="Greedy tokens decoded to measure tokens/s (0 skips the measurement).")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for torch and onnxruntime while evaluating and timing (0 = torch's default).")
