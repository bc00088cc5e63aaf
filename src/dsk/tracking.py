"""Run tracking: intermediate-metric observers (used by `dsk tune` for pruning) and MLflow.

Training loops call :func:`report` at each evaluation; whoever is observing (a tuning study
deciding whether to prune, a progress display) gets the numbers. With ``--mlflow`` on a
stage (or ``tracking: mlflow`` in a pipeline file) each finished run also logs its params,
metrics and artifact id to MLflow — ``./mlruns/mlflow.db`` by default, or
``$MLFLOW_TRACKING_URI``. Without it, nothing MLflow-related is imported.

    $ dsk pretrain --mlflow
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

Observer = Callable[[int, dict[str, Any]], None]
_observers: list[Observer] = []
_mlflow = {"enabled": False}


def report(step: int, metrics: dict[str, Any]) -> None:
    """Publish intermediate metrics (e.g. validation loss at step N) to any observer."""
    for observer in list(_observers):
        observer(step, metrics)


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def enable_mlflow(enabled: bool = True) -> None:
    _mlflow["enabled"] = enabled


def mlflow_enabled() -> bool:
    return _mlflow["enabled"] or os.environ.get("DSK_MLFLOW", "") not in ("", "0")


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def log_to_mlflow(manifest: dict[str, Any]) -> str:
    """Log one finished artifact's params, numeric metrics and ids as an MLflow run."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        os.makedirs("mlruns", exist_ok=True)
        uri = "sqlite:///mlruns/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("dsk")
    params: dict[str, Any] = {}
    _flat("", manifest.get("params", {}), params)
    metrics: dict[str, Any] = {}
    _flat("", manifest.get("metrics", {}), metrics)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with mlflow.start_run(run_name=f"{manifest['stage']}-{manifest['id']}") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        if numeric:
            mlflow.log_metrics(numeric)
        mlflow.set_tags({
            "dsk.stage": manifest["stage"],
            "dsk.id": manifest["id"],
            "dsk.kind": manifest.get("kind", ""),
            "dsk.inputs": ",".join(str(i.get("id") or i.get("sha256")) for i in manifest.get("inputs", [])),
            "dsk.seed": str(manifest.get("seed")),
            "dsk.code_version": manifest.get("code_version", ""),
        })
        return run.info.run_id
