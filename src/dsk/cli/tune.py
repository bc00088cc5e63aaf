"""`dsk tune`: Bayesian (TPE) or random hyperparameter search over a stage's params.

    $ dsk tune --stage pretrain --trials 20 --space lr=loguniform:1e-4:3e-2 --metric val_bpb
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from dsk import console


def tune(
    stage: str = typer.Option(..., "--stage", help="The stage whose params are searched, e.g. pretrain."),
    space: list[str] = typer.Option([], "--space", help="NAME=KIND:ARGS, KIND one of loguniform:LO:HI, uniform:LO:HI, int:LO:HI, intlog:LO:HI, choice:A,B,C (repeatable).", show_default=False),
    metric: str = typer.Option(..., "--metric", help="The artifact metric to optimise, e.g. val_bpb."),
    trials: int = typer.Option(20, "--trials", help="Total trials in the study (a resumed study runs only the rest)."),
    direction: str = typer.Option("minimize", "--direction", help="minimize or maximize the metric."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop starting new trials after this many minutes.", show_default=False),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (Bayesian, Optuna's TPE) or random."),
    source: Optional[str] = typer.Option(None, "--from", help="The stage's input artifact (default: the latest upstream one).", show_default=False),
    set_: list[str] = typer.Option([], "--set", help="Fix a param for every trial: --set key=value (repeatable).", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and of every trial."),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="Stop unpromising trials early (median rule on intermediate metrics)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: derived from stage, input, space, metric, sampler, seed).", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings, errors and the result."),
    json_: bool = typer.Option(False, "--json", help="Print the study as JSON on stdout."),
) -> None:
    """Search a stage's params with Optuna; every trial is a cached artifact; resumable."""
    from dsk.errors import DskError
    from dsk.tune import run_tune

    if sampler not in ("tpe", "random"):
        raise DskError(f"--sampler must be tpe or random, got {sampler!r}")
    console.set_mode(quiet=quiet, json_output=json_)
    result = run_tune(stage=stage, space=space, trials=trials, metric=metric, direction=direction,  # type: ignore[arg-type]
                      budget_minutes=budget_minutes, sampler=sampler, source=source, overrides=set_,  # type: ignore[arg-type]
                      seed=seed, prune=prune, study_name=study)
    if json_:
        console.print_json(result)
        return
    table = Table(title=f"study {result['study']} ({result['sampler']}, {metric})", title_justify="left")
    for col in ("#", "state", metric, "params", "artifact"):
        table.add_column(col)
    for row in result["trials"]:
        value = f"{row['value']:.4g}" if row["value"] is not None else ""
        table.add_row(str(row["number"]), row["state"], value,
                      ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()),
                      row["artifact_id"] or "")
    console.console.print(table)
    best = result["best"]
    if best:
        console.console.print(f"best: {metric}={best['value']:.6g} (trial {best['number']}, artifact {best['artifact_id']})\n"
                              f"override file: {best['override_file']}")
