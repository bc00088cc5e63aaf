"""Loading a model artifact for serving: the model on its device, its tokenizer, an engine.

    >>> engine, codec = load_engine(".dsk/artifacts/pretrain/<id>", max_batch_size=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsk.errors import DskError
from dsk.serving.filter import ContentFilter


def pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise DskError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DskError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return device


def load_codec(artifact_dir: str | Path) -> Any:
    """The artifact's tokenizer as a TextCodec; a one-line error when it has none."""
    from dsk.serving.text import TextCodec

    path = Path(artifact_dir)
    if not (path / "tokenizer.json").is_file():
        raise DskError(f"{str(path)!r} holds no tokenizer.json; a model artifact needs one to serve text")
    return TextCodec.from_artifact(path)


def load_engine(
    artifact_dir: str | Path,
    *,
    backend: str = "torch",
    device: str = "cpu",
    max_batch_size: int = 16,
    max_queue: int = 128,
    content_filter: ContentFilter | None = None,
    static: bool | None = None,
    overlap: bool | None = None,
) -> tuple[Any, Any]:
    """(engine, codec) for a model artifact; the engine is not started yet.

    An artifact that holds only an ONNX export (``model.onnx`` + ``onnx.json``, no
    ``model.safetensors``) is served by the ONNX backend whatever ``backend`` says.
    ``static`` picks the torch backend's fixed-shape steps (CUDA graphs on CUDA); None: on CUDA only.
    ``overlap``: launch each step before reading the last one's tokens where the backend can
    (fixed-shape steps); None or True: wherever it can, False: never.
    """
    from dsk.serving.engine import Engine, OnnxBackend

    path = Path(artifact_dir)
    is_onnx = (path / "model.onnx").is_file() and (path / "onnx.json").is_file()
    codec = load_codec(path)
    if backend == "onnx" or (is_onnx and not (path / "model.safetensors").is_file()):
        if not is_onnx:
            raise DskError(f"{str(path)!r} holds no ONNX export (model.onnx + onnx.json); run "
                           f"`dsk export --format onnx` and serve that artifact, or use --backend torch")
        if device == "cuda":
            raise DskError("the ONNX backend runs on the CPU; use --device cpu, or --backend torch for CUDA")
        from dsk.models.onnx_runtime import OnnxLM

        import torch

        lm = OnnxLM(path, threads=torch.get_num_threads())
        engine = Engine(OnnxBackend(lm, max_batch_size), codec, max_batch_size=max_batch_size,
                        max_queue=max_queue, content_filter=content_filter)
        return engine, codec
    import torch

    from dsk.models import load_model

    if not (path / "model.safetensors").is_file():
        raise DskError(f"{str(path)!r} holds no model.safetensors; serve a pretrain, finetune or quantize artifact")
    device = pick_device(device)
    model, _hf_tokenizer, _cfg = load_model(path, device=device)
    model.eval()
    if device == "cuda":
        # fp32 weights with TF32 matmuls: casting the model to bf16 would also cast its rotary
        # tables, which training (bf16 autocast) kept in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    engine = Engine(model, codec, max_batch_size=max_batch_size, max_queue=max_queue,
                    content_filter=content_filter, device=device, static=static, overlap=overlap)
    return engine, codec
