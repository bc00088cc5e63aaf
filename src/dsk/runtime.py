"""Running one stage: resolve its input, check the cache, build into a staging dir, commit.

Every stage's ``run(...)`` calls :func:`run_stage` with a ``build(ctx)`` function that writes
payload files into ``ctx.out`` and fills ``ctx.metrics``. This module owns the cache key, the
manifest, the per-artifact ``log.txt`` and atomicity, so stages never handle them.

    $ dsk clean data/sample/tinyshakespeare.txt     # runs
    $ dsk clean data/sample/tinyshakespeare.txt     # cache hit: same inputs, params, code
"""

from __future__ import annotations

import importlib
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from dsk import __version__, console, tracking
from dsk.artifacts import (
    MANIFEST_SCHEMA,
    Artifact,
    RawInput,
    Store,
    compute_id,
    git_commit,
    hash_raw_input,
    utc_now,
    write_manifest,
)
from dsk.config import StageParams
from dsk.errors import DskError
from dsk.registry import spec

Input = Union[Artifact, RawInput]


@dataclass
class StageContext:
    """What a stage's build function gets: where to write, what it reads, how to report."""

    stage: str
    out: Path
    inputs: list[Input]
    params: StageParams
    seed: int
    log: logging.Logger
    store: Store
    kind: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    key_metric: str | None = None
    extra_inputs: list[Artifact] = field(default_factory=list)
    artifact_id: str = ""  # the id the artifact will have once committed (e.g. to key resumable runs)

    @property
    def input(self) -> Input:
        return self.inputs[0]


@dataclass
class StageResult:
    artifact: Artifact
    cached: bool
    seconds: float

    @property
    def key_metric(self) -> tuple[str, Any] | None:
        name = self.artifact.manifest.get("key_metric")
        if name and name in self.artifact.metrics:
            return name, self.artifact.metrics[name]
        return None

    def summary(self) -> dict[str, Any]:
        km = self.key_metric
        return {
            "stage": self.artifact.stage,
            "id": self.artifact.id,
            "kind": self.artifact.kind,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "path": str(self.artifact.path),
            "key_metric": {km[0]: km[1]} if km else None,
            "metrics": self.artifact.metrics,
        }


def resolve_inputs(store: Store, stage: str, source: str | Path | None) -> list[Input]:
    """The stage's input: an explicit id/tag/path, or the latest artifact of the stage before it."""
    st = spec(stage)
    if source is None or str(source) == "":
        if not st.upstream:
            raise DskError(f"`dsk {stage}` needs an input path, e.g. `dsk {stage} data/raw`")
        art = store.latest_of(list(st.upstream))
        if art is None:
            before = " or ".join(f"`dsk {s}`" for s in st.upstream)
            raise DskError(f"no input for {stage}: run {before} first, or pass --from ID|PATH|TAG")
        return [art]
    text = str(source)
    path = Path(text)
    if path.exists():
        if (path / "manifest.json").exists():
            return [store.resolve(text)]
        if not st.accepts_raw:
            raise DskError(
                f"{stage} reads artifacts, not raw files: {text!r} is a path; "
                f"run `dsk clean {text}` first or pass an artifact id"
            )
        return [hash_raw_input(path)]
    try:
        return [store.resolve(text)]
    except DskError:
        if st.accepts_raw and ("/" in text or "." in text):
            raise DskError(f"input path {text!r} does not exist; check the path") from None
        raise


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if record.levelno >= logging.WARNING:
            console.warn(msg)
        else:
            console.info(f"  {msg}")


def _make_logger(stage: str, log_path: Path) -> tuple[logging.Logger, list[logging.Handler]]:
    logger = logging.getLogger(f"dsk.run.{stage}.{log_path.parent.name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console_handler = _ConsoleHandler()
    console_handler.setFormatter(logging.Formatter("%(message)s"))
    handlers: list[logging.Handler] = [file_handler, console_handler]
    for h in handlers:
        logger.addHandler(h)
    return logger, handlers


def run_stage(
    *,
    stage: str,
    params: StageParams,
    inputs: Sequence[Input],
    build: Callable[[StageContext], None] | str,
    store: Store | None = None,
    seed: int = 0,
    force: bool = False,
    kind: str = "",
    stage_version: str = "1",
    extra_inputs: Sequence[Artifact] = (),
) -> StageResult:
    """Run ``build`` unless an artifact with the same cache key exists; commit atomically.

    ``build`` may be a ``"module:function"`` string: it is imported only when the stage really
    runs, so a cache hit never pays for heavy imports such as torch (a cached pipeline must
    finish in well under two seconds).

    The key is (stage, input keys, params, seed, code version). ``stage_version`` is the
    stage's own output-format version: bump it when the same params would now give
    different bytes, so old cache entries stop matching.
    """
    store = store or Store.open()
    started = time.perf_counter()
    all_inputs: list[Input] = [*inputs, *extra_inputs]
    params_dict = params.model_dump(mode="json")
    code_version = f"dsk-{__version__}/{stage}-v{stage_version}"
    artifact_id = compute_id(
        stage=stage,
        input_keys=[i.key for i in all_inputs],
        params=params_dict,
        seed=seed,
        code_version=code_version,
    )

    # ---- cache lookup: an intact artifact with this id means there is nothing to do
    final = store.artifact_dir(stage, artifact_id)
    if final.exists() and not force:
        art = store.resolve(str(final))
        store.set_latest(art)
        return StageResult(art, cached=True, seconds=time.perf_counter() - started)

    # ---- build into a staging dir; only a complete artifact is renamed into place
    if isinstance(build, str):
        module_name, _, func_name = build.partition(":")
        build = getattr(importlib.import_module(module_name), func_name)
    with store.staging(stage, artifact_id) as tmp:
        logger, handlers = _make_logger(stage, tmp / "log.txt")
        ctx = StageContext(
            stage=stage,
            out=tmp,
            inputs=list(inputs),
            params=params,
            seed=seed,
            log=logger,
            store=store,
            kind=kind,
            extra_inputs=list(extra_inputs),
            artifact_id=artifact_id,
        )
        started_at = utc_now()
        try:
            logger.info(f"{stage} {artifact_id}: building")
            build(ctx)
            logger.info(f"{stage} {artifact_id}: done in {time.perf_counter() - started:.1f}s")
        finally:
            for h in handlers:
                logger.removeHandler(h)
                h.close()
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "stage": stage,
            "id": artifact_id,
            "kind": ctx.kind,
            "inputs": [i.to_manifest_ref() if isinstance(i, Artifact) else i.to_manifest() for i in all_inputs],
            "params": params_dict,
            "seed": seed,
            "code_version": code_version,
            "dsk_version": __version__,
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "started_at": started_at,
            "finished_at": utc_now(),
            "duration_s": round(time.perf_counter() - started, 3),
            "metrics": ctx.metrics,
            "key_metric": ctx.key_metric,
        }
        write_manifest(tmp, manifest)
        final = store.commit(tmp, stage, artifact_id, replace=force)
    art = store.resolve(str(final))
    store.set_latest(art)
    if tracking.mlflow_enabled():
        tracking.log_to_mlflow(art.manifest)
    return StageResult(art, cached=False, seconds=time.perf_counter() - started)
