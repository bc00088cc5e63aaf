"""Parameters of `dsk export`.

    $ dsk export --format hf
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsk.config import StageParams


class Params(StageParams):
    format: Literal["onnx", "hf", "safetensors"] = Field(
        "onnx",
        description="'onnx': one decoder graph with past key/values for onnxruntime; 'hf': a transformers "
        "checkpoint (LlamaForCausalLM or DeepseekV3ForCausalLM); 'safetensors': weights + config only.",
    )
    opset: int = Field(17, ge=14, le=21, description="ONNX opset version.")
    tolerance: float = Field(1e-4, gt=0.0, le=1.0, description="ONNX/hf: the largest |logit difference| vs torch that verification accepts.")
    verify_prompts: int = Field(3, ge=1, le=64, description="ONNX: random prompts used for the parity and cached-generation checks.")
    verify_tokens: int = Field(32, ge=1, le=1024, description="ONNX: greedy tokens that onnxruntime (with its KV cache) must generate exactly as torch does.")
    bench_tokens: int = Field(32, ge=0, le=4096, description="ONNX: greedy tokens decoded to compare onnxruntime and torch tokens/s (0 skips).")
    threads: int = Field(0, ge=0, le=256, description="CPU threads for torch and onnxruntime while evaluating and timing (0 = torch's default).")
