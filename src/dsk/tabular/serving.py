"""`dsk serve` on a table model: the API app with ``POST /v1/predict`` and no text engine.

    $ dsk serve <table-model-or-export-artifact> --port 8000
    $ curl -s localhost:8000/v1/predict -d '{"rows": [{"mean_radius": 14.2, ...}]}'
    {"object": "prediction", "classes": [0, 1], "labels": [1], "probabilities": [[0.03, 0.97]]}

A row with a missing or extra column, a wrong type, or NaN/null where the model cannot
impute it is answered 400 with the column named (``dsk.tabular.preprocess``).
"""

from __future__ import annotations

from typing import Any

TABLE_MODEL_KINDS = ("table-model", "table-onnx")


def build_table_app(art: Any, params: Any, *, api_keys: list[str]):
    """(app, None, config) like ``dsk.serve.stage.build_app``, for a table model."""
    from dsk.serving.app import ServerConfig, create_app
    from dsk.serving.audit import AuditLog
    from dsk.tabular.predict import TablePredictor

    predictor = TablePredictor.load(art.path)
    config = ServerConfig(
        model_name=getattr(params, "model_name", None) or art.id,
        aliases=tuple(dict.fromkeys([art.id, "dsk"])),
        api_keys=tuple(api_keys),
        request_timeout_s=getattr(params, "request_timeout_s", 120.0),
        max_body_bytes=getattr(params, "max_body_bytes", 1 << 20),
        job_ttl_s=getattr(params, "job_ttl_s", 600.0),
    )
    audit = AuditLog(getattr(params, "audit_log", None), log_prompts=getattr(params, "log_prompts", False),
                     redact_pii=getattr(params, "redact_pii", False))
    return create_app(None, None, config, audit=audit, predictor=predictor), None, config


def serve_table(art: Any, params: Any) -> None:
    import os

    from dsk import console
    from dsk.serving.auth import collect_keys
    from dsk.serving.server import serve_forever

    keys = collect_keys(params.api_key, dict(os.environ))
    app, _, config = build_table_app(art, params, api_keys=keys)
    console.info(f"serving table model {art.stage} [bold]{art.id}[/bold] as {config.model_name!r} on "
                 f"http://{params.host}:{params.port}: POST /v1/predict; Ctrl-C stops")
    serve_forever(app, params.host, params.port, log_level=params.log_level)
