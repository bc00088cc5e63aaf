"""`dsk serve`'s options: every field is a `--flag` with its description as help.

    $ dsk serve --help
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from dsk.config import StageParams


class Params(StageParams):
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="Inference backend; an artifact holding only an ONNX export is served with onnx."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    threads: int = Field(
        0, ge=0, description="torch CPU threads (0 = torch's default; 1 is best on a busy few-core machine)."
    )
    model_name: Optional[str] = Field(
        None, description="Model id clients send and /v1/models lists (default: the artifact id; 'dsk' also works)."
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Sequences decoded together (continuous batching).")
    overlap: bool = Field(
        True, description="Launch each decode step before reading the last one's tokens, so that text, events and "
                          "HTTP work overlap the device (fixed-shape steps, i.e. CUDA); --no-overlap: one step at a time.")
    engine_process: Optional[bool] = Field(
        None, description="Run the engine (scheduler, model steps, sampling, detokenising, stop strings) in its own "
                          "process, so HTTP work does not share its GIL; API keys, filter, audit, SSE, jobs and metrics "
                          "stay in the API process. The engine process exits with the server. Default: on for the "
                          "torch backend on CUDA (16 clients on an H100: 9.1x vs 7.8x the batch-1 server), off on CPU, "
                          "where cores are scarce (docs/serve.md).")
    max_queue: int = Field(256, ge=0, description="Requests waiting for a batch slot (beyond the free ones) before new ones get 429.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request running longer is ended (504).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body (413 above).")
    job_ttl_s: float = Field(600.0, gt=0, description="Async jobs are kept this long after they finish unless fetched.")
    api_key: Optional[str] = Field(
        None, description="Require this API key (comma-separated for several; also read from DSK_API_KEYS)."
    )
    blocklist: Optional[str] = Field(None, description="Content filter: a file of blocked words, or re:REGEX lines.")
    audit_log: Optional[str] = Field(None, description="Append one JSON line per API request to this file.")
    log_prompts: bool = Field(False, description="Also write prompts and outputs to the audit log.")
    redact_pii: bool = Field(False, description="Mask e-mail addresses and phone numbers in logged prompts.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "warning", description="uvicorn's log level."
    )
    smoke_test: bool = Field(
        False, description="Start on a free port, send one chat request, check the answer, stop (for pipelines)."
    )

    def use_engine_process(self) -> bool:
        """``engine_process`` as set, or the default: torch on CUDA (device cuda, or auto with a GPU)."""
        if self.engine_process is not None:
            return self.engine_process
        if self.backend != "torch" or self.device == "cpu":
            return False
        from dsk.serving.loader import pick_device

        # an explicit cuda is taken at its word here; loading the model checks that the GPU is there
        return self.device == "cuda" or pick_device("auto") == "cuda"
