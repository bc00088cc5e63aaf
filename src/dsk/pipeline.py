"""Pipeline files: validate every step against its stage's params schema, then run in order.

A pipeline file lists steps; each step runs one stage on the previous step's output (or on
``input:``, a path or artifact reference, or ``from:``, an earlier step's name)::

    name: default
    seed: 0
    steps:
      - stage: clean
        input: data/sample/tinyshakespeare.txt
        params: {min_words: 5}
      - stage: featurize
        params: {vocab_size: 512}

    $ dsk run pipelines/default.yaml --set clean.min_words=3 --until featurize
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from dsk import console
from dsk.artifacts import Store
from dsk.config import StageParams, build_params, load_yaml_file, parse_overrides
from dsk.errors import DskError
from dsk.registry import BY_NAME

STEP_KEYS = {"stage", "name", "input", "from", "params", "seed"}
FILE_KEYS = {"name", "description", "seed", "steps", "tracking"}


@dataclass
class Step:
    name: str
    stage: str
    params: StageParams
    seed: int
    input: str | None = None
    from_step: str | None = None
    raw_params: dict[str, Any] = field(default_factory=dict)


def _schema(stage: str) -> type[StageParams]:
    from dsk.cli.common import load_stage

    return load_stage(stage).Params


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[dict[str, Any], list[Step]]:  # type: ignore[assignment]
    """Parse and validate a pipeline file; every problem is one line naming file and key."""
    path = Path(path)
    where = str(path)
    doc = load_yaml_file(path, what="pipeline file", hint="see pipelines/ for examples")
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        raise DskError(f"{where}: expected a mapping with a 'steps' list")
    unknown = set(doc) - FILE_KEYS
    if unknown:
        raise DskError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(FILE_KEYS))}")
    if doc.get("tracking") not in (None, "none", "mlflow"):
        raise DskError(f"{where}: tracking must be 'mlflow' or 'none', got {doc.get('tracking')!r}")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int):
        raise DskError(f"{where}: seed must be an integer, got {seed!r}")

    by_step: dict[str, dict[str, Any]] = {}
    for dotted, value in parse_overrides(list(overrides)).items():
        step_name, sep, key = dotted.partition(".")
        if not sep:
            raise DskError(f"--set {dotted}: expected STEP.param=value, e.g. --set clean.min_words=5")
        by_step.setdefault(step_name, {})[key] = value

    steps: list[Step] = []
    names: set[str] = set()
    for i, raw in enumerate(doc["steps"]):
        loc = f"{where}: steps[{i}]"
        if not isinstance(raw, dict) or "stage" not in raw:
            raise DskError(f"{loc}: each step needs a 'stage' key; stages: {', '.join(BY_NAME)}")
        bad = set(raw) - STEP_KEYS
        if bad:
            raise DskError(f"{loc}: unknown key {sorted(bad)[0]!r}; allowed: {', '.join(sorted(STEP_KEYS))}")
        stage = raw["stage"]
        if stage not in BY_NAME:
            raise DskError(f"{loc}: unknown stage {stage!r}; allowed: {', '.join(BY_NAME)}")
        if not BY_NAME[stage].implemented:
            raise DskError(f"{loc}: stage {stage!r} is not implemented yet; remove the step")
        name = raw.get("name", stage)
        if name in names:
            raise DskError(f"{loc}: duplicate step name {name!r}; give the step a unique 'name'")
        names.add(name)
        from_step = raw.get("from")
        if from_step is not None and from_step not in names:
            raise DskError(f"{loc}: 'from: {from_step}' names no earlier step; earlier: {', '.join(sorted(names - {name})) or 'none'}")
        values = raw.get("params") or {}
        if not isinstance(values, dict):
            raise DskError(f"{loc}.params: expected a mapping of param: value")
        values = {**values, **by_step.pop(name, {})}
        params = build_params(_schema(stage), values, where=f"{where}: step {name!r} ({stage}) params")
        step_seed = raw.get("seed", seed)
        if not isinstance(step_seed, int):
            raise DskError(f"{loc}.seed: must be an integer, got {step_seed!r}")
        steps.append(Step(name=name, stage=stage, params=params, seed=step_seed,
                          input=raw.get("input"), from_step=from_step, raw_params=values))
    if by_step:
        extra = sorted(by_step)[0]
        raise DskError(f"--set {extra}.…: no step named {extra!r}; steps: {', '.join(s.name for s in steps)}")
    return doc, steps


def run_pipeline(
    path: str | Path, *, overrides: list[str] = (), until: str | None = None, force: bool = False  # type: ignore[assignment]
) -> dict[str, Any]:
    """Run the steps in order; return a report with each step's id, cache status and time."""
    from dsk.cli.common import load_stage

    started = time.perf_counter()
    doc, steps = load_pipeline(path, overrides)
    if until is not None and not any(until in (s.name, s.stage) for s in steps):
        raise DskError(f"--until {until}: no such step; steps: {', '.join(s.name for s in steps)}")
    if doc.get("tracking") == "mlflow":
        from dsk import tracking

        tracking.enable_mlflow()
    store = Store.open()
    outputs: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    previous: str | None = None
    for step in steps:
        source = step.input or (outputs[step.from_step] if step.from_step else previous)
        console.info(f"[bold]▶ {step.name}[/bold] ({step.stage})")
        module = load_stage(step.stage)
        step_started = time.perf_counter()
        result = module.run(source=source, params=step.params, seed=step.seed, force=force, store=store)
        if result is None or isinstance(result, dict):  # a step with no artifact, e.g. a serve smoke test
            metrics = {k: v for k, v in (result or {}).items() if isinstance(v, (bool, int, float))}
            rows.append({"step": step.name, "stage": step.stage, "id": "", "cached": False,
                         "seconds": round(time.perf_counter() - step_started, 3), "metrics": metrics,
                         "key_metric": {k: metrics[k] for k in ("ok", "latency_s") if k in metrics} or None})
        else:
            summary = result.summary()
            summary["step"] = step.name
            rows.append(summary)
            outputs[step.name] = str(result.artifact.path)
            previous = outputs[step.name]
        if until is not None and until in (step.name, step.stage):
            break
    return {"pipeline": str(path), "name": doc.get("name", Path(path).stem), "steps": rows,
            "seconds": round(time.perf_counter() - started, 3)}


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"pipeline {report['name']}", title_justify="left")
    for col in ("step", "stage", "id", "status", "seconds", "key metric"):
        table.add_column(col)
    for row in report["steps"]:
        km = row.get("key_metric") or {}
        metric = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in km.items())
        status = "[cyan]cached[/cyan]" if row.get("cached") else "[green]ran[/green]"
        table.add_row(row["step"], row["stage"], row.get("id", ""), status, f"{row.get('seconds', 0):.2f}", metric)
    console.console.print(table)
    console.console.print(f"total {report['seconds']:.2f}s")
    for row in report["steps"]:
        if row["stage"] == "report" and row.get("path"):
            console.console.print(f"report: {row['path']}/report.html")
