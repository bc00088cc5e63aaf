"""Bayesian hyperparameter search over any stage's params with Optuna (TPE), resumable.

Each trial runs the stage with the suggested params, so every trial is an ordinary artifact:
a rerun of a finished study is all cache hits. The study lives in the workspace
(``.dsk/tune/studies.db``, SQLite), so an interrupted search resumes where it stopped: trials
left running by a killed process are marked failed and queued again. Trials report
intermediate metrics through :mod:`dsk.tracking`, and unpromising ones are pruned early
(median rule). The best params are printed and written as a pipeline override file.

    $ dsk tune --stage pretrain --trials 20 --space lr=loguniform:1e-4:3e-2 \\
          --space n_layers=int:2:6 --metric val_bpb --budget-minutes 30
    $ dsk run pipelines/default.yaml --overrides .dsk/tune/<study>.best.yaml
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dsk import console, tracking
from dsk.artifacts import Store, canonical_json
from dsk.config import build_params, load_yaml_file, parse_overrides, parse_scalar
from dsk.errors import DskError
from dsk.registry import spec

KINDS = ("loguniform", "uniform", "int", "intlog", "choice")


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        if self.kind == "intlog":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=True)
        return trial.suggest_categorical(self.name, list(self.choices))


def parse_space(items: list[str], allowed: list[str]) -> list[Dimension]:
    """``lr=loguniform:1e-4:3e-2``, ``n_layers=int:2:6``, ``optimizer=choice:adamw,lion``."""
    if not items:
        raise DskError("give at least one --space NAME=KIND:ARGS, e.g. --space lr=loguniform:1e-4:3e-2")
    dims = []
    for item in items:
        name, sep, rest = item.partition("=")
        kind, _, args = rest.partition(":")
        if not sep or kind not in KINDS or not args:
            raise DskError(f"--space {item!r}: expected NAME=KIND:ARGS with KIND one of {', '.join(KINDS)}")
        if name not in allowed:
            raise DskError(f"--space {item!r}: unknown param {name!r}; allowed: {', '.join(allowed)}")
        if kind == "choice":
            dims.append(Dimension(name, kind, choices=tuple(parse_scalar(c) for c in args.split(","))))
            continue
        try:
            low, high = (float(x) for x in args.split(":"))
        except ValueError:
            raise DskError(f"--space {item!r}: expected {kind}:LOW:HIGH with two numbers") from None
        if not low < high or (kind in ("loguniform", "intlog") and low <= 0):
            raise DskError(f"--space {item!r}: need 0 < LOW < HIGH for log scales and LOW < HIGH otherwise")
        dims.append(Dimension(name, kind, low, high))
    return dims


def _study_name(stage: str, input_key: str, dims: list[Dimension], fixed: dict[str, Any], metric: str,
                direction: str, sampler: str, seed: int) -> str:
    payload = canonical_json({"stage": stage, "input": input_key, "space": [d.__dict__ for d in dims],
                              "fixed": fixed, "metric": metric, "direction": direction,
                              "sampler": sampler, "seed": seed})
    return f"{stage}-{sampler}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def run_tune(
    *,
    stage: str,
    space: list[str],
    trials: int = 20,
    metric: str,
    direction: Literal["minimize", "maximize"] = "minimize",
    budget_minutes: float | None = None,
    sampler: Literal["tpe", "random"] = "tpe",
    source: str | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    seed: int = 0,
    prune: bool = True,
    study_name: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Run (or resume) a study; return the trials and the best params."""
    import optuna
    from optuna.trial import TrialState

    from dsk.cli.common import load_stage
    from dsk.runtime import resolve_inputs

    st = spec(stage)
    module = load_stage(st.name)
    schema = module.Params
    if trials < 1:
        raise DskError(f"--trials must be at least 1, got {trials}")
    if direction not in ("minimize", "maximize"):
        raise DskError(f"--direction must be minimize or maximize, got {direction!r}")
    dims = parse_space(list(space), list(schema.model_fields))
    fixed = parse_overrides(list(overrides))
    build_params(schema, fixed, where=f"dsk tune --stage {stage} --set")  # validate before any trial
    store = store or Store.open()
    store.ensure_writable()
    inputs = resolve_inputs(store, stage, source)
    input_key = inputs[0].key
    source_ref = str(inputs[0].path)
    name = study_name or _study_name(stage, input_key, dims, fixed, metric, direction, sampler, seed)
    tune_dir = store.root / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{tune_dir / 'studies.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen_sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, trials))
                      if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=chosen_sampler,
                                pruner=pruner, load_if_exists=True)

    # ---- resume: trials left RUNNING by a killed process are failed and queued again
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=True)
        console.info(f"resuming: trial {t.number} was interrupted; queued again")
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(0, trials - done)
    console.info(f"study {name}: {done} trial(s) done, {remaining} to run (storage {storage})")

    def objective(trial: Any) -> float:
        values = dict(fixed)
        values.update({d.name: d.suggest(trial) for d in dims})
        params = build_params(schema, values, where=f"dsk tune trial {trial.number}")

        def observe(step: int, metrics: dict[str, Any]) -> None:
            if metric in metrics and prune:
                trial.report(float(metrics[metric]), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {metric}={metrics[metric]:.4g}")

        started = time.perf_counter()
        with tracking.observing(observe):
            result = module.run(source=source_ref, params=params, seed=seed, store=store)
        trial.set_user_attr("artifact_id", result.artifact.id)
        trial.set_user_attr("cached", result.cached)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        value = result.artifact.metrics.get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise DskError(f"metric {metric!r} not in the {stage} artifact's metrics; "
                           f"available: {', '.join(sorted(result.artifact.metrics))}")
        console.info(f"trial {trial.number}: {metric}={value:.4g} "
                     f"({'cached' if result.cached else 'ran'}) {values}")
        return float(value)

    if remaining:
        study.optimize(objective, n_trials=remaining,
                       timeout=budget_minutes * 60 if budget_minutes else None,
                       catch=(), gc_after_trial=True)

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "artifact_id": t.user_attrs.get("artifact_id"), "cached": t.user_attrs.get("cached")}
            for t in study.get_trials(deepcopy=False)]
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if completed:
        bt = study.best_trial
        best = {"value": bt.value, "params": bt.params, "artifact_id": bt.user_attrs.get("artifact_id"),
                "number": bt.number}
        override = tune_dir / f"{name}.best.yaml"
        override.write_text(
            f"# dsk tune: best of study {name} ({metric}={bt.value:.6g}, trial {bt.number})\n"
            f"# use: dsk run PIPELINE --overrides {override}\n"
            + yaml.safe_dump({stage: {**fixed, **bt.params}}, sort_keys=True)
        )
        best["override_file"] = str(override)
    return {"study": name, "storage": storage, "metric": metric, "direction": direction,
            "sampler": sampler, "trials": rows, "best": best}


def load_override_file(path: str | Path) -> list[str]:
    """Read a ``{step: {param: value}}`` YAML file as ``step.param=value`` overrides."""
    p = Path(path)
    data = load_yaml_file(p, what="overrides file") or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DskError(f"overrides file {str(p)!r} must map step names to {{param: value}}")
    return [f"{step}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for step, params in data.items() for k, v in params.items()]
