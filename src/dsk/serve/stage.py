"""`dsk serve`'s work: resolve the model artifact, build the engine and the API, run uvicorn.

    $ dsk serve --port 8000
"""

from __future__ import annotations

import os
from pathlib import Path

from dsk import console
from dsk.artifacts import Artifact, Store
from dsk.errors import DskError
from dsk.runtime import resolve_inputs
from dsk.serve.params import Params


def resolve_model(store: Store, source: str | Path | None) -> Artifact:
    art = resolve_inputs(store, "serve", source)[0]
    if not isinstance(art, Artifact):
        raise DskError(f"{source!r} is not a model artifact; pass a model artifact id, tag or path")
    if art.kind and art.kind not in ("model", "table-model", "table-onnx"):
        raise DskError(f"artifact {art.id} is a {art.kind!r} artifact ({art.stage}), not a model; "
                       f"serve a pretrain, finetune, quantize or export artifact")
    return art


def build_app(art: Artifact, params: Params, *, api_keys: list[str]):
    if art.kind in ("table-model", "table-onnx"):  # issue 12: POST /v1/predict, no text engine
        from dsk.tabular.serving import build_table_app

        return build_table_app(art, params, api_keys=api_keys)
    from dsk.serving.app import ServerConfig, create_app
    from dsk.serving.audit import AuditLog
    from dsk.serving.filter import ContentFilter
    from dsk.serving.loader import load_codec, load_engine

    content_filter = ContentFilter.load(params.blocklist) if params.blocklist else None
    if params.use_engine_process():
        from dsk.serving.engine_process import EngineProcess

        codec = load_codec(art.path)
        engine = EngineProcess(
            "dsk.serving.engine_process:engine_from_artifact",
            {"artifact_dir": str(art.path), "backend": params.backend, "device": params.device,
             "max_batch_size": params.max_batch_size, "overlap": params.overlap},
            max_queue=params.max_queue, content_filter=content_filter, threads=params.threads)
    else:
        engine, codec = load_engine(art.path, backend=params.backend, device=params.device,
                                    max_batch_size=params.max_batch_size, max_queue=params.max_queue,
                                    content_filter=content_filter, overlap=params.overlap)
    config = ServerConfig(
        model_name=params.model_name or art.id,
        aliases=tuple(dict.fromkeys([art.id, "dsk"])),
        api_keys=tuple(api_keys),
        request_timeout_s=params.request_timeout_s,
        max_body_bytes=params.max_body_bytes,
        job_ttl_s=params.job_ttl_s,
    )
    audit = AuditLog(params.audit_log, log_prompts=params.log_prompts, redact_pii=params.redact_pii)
    return create_app(engine, codec, config, content_filter=content_filter, audit=audit), engine, config


def run(*, source=None, params: Params, seed: int = 0, force: bool = False, store: Store | None = None) -> None:
    store = store or Store.open()
    art = resolve_model(store, source)
    if art.kind in ("table-model", "table-onnx"):  # issue 12
        from dsk.tabular.serving import serve_table

        return serve_table(art, params)
    if params.smoke_test:
        # recorded as a small artifact in the model's lineage: the same model, serve settings and
        # code are not started again on a rerun (a cache hit that says so; --force reruns it)
        from dsk.runtime import run_stage

        return run_stage(stage="serve", params=params, inputs=[art], build="dsk.serve.smoke:build",
                         seed=seed, force=force, store=store)
    from dsk.serving.auth import collect_keys
    from dsk.serving.server import serve_forever

    if params.threads:
        import torch

        torch.set_num_threads(params.threads)
    keys = collect_keys(params.api_key, dict(os.environ))
    app, engine, config = build_app(art, params, api_keys=keys)
    console.info(
        f"serving {art.stage} [bold]{art.id}[/bold] as {config.model_name!r} on "
        f"http://{params.host}:{params.port} (device {engine.device}, max batch {engine.max_batch_size}, "
        f"{'engine process %d, ' % engine.pid if hasattr(engine, 'pid') else ''}"
        f"{'%d API key(s)' % len(keys) if keys else 'no API key'}); Ctrl-C stops"
    )
    serve_forever(app, params.host, params.port, log_level=params.log_level)
    return None
