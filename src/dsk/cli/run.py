"""`dsk run PIPELINE.yaml`: run a pipeline file's stages in order, skipping cache hits.

    $ dsk run pipelines/default.yaml --set pretrain.max_steps=50 --until featurize
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dsk import console


def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file, e.g. pipelines/default.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a step param: --set STEP.param=value (repeatable).", show_default=False),
    overrides: Optional[Path] = typer.Option(None, "--overrides", help="YAML file {step: {param: value}}, e.g. written by `dsk tune`.", show_default=False),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this step (name or stage).", show_default=False),
    force: bool = typer.Option(False, "--force", help="Rerun every step even on a cache hit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings, errors and the summary."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout."),
) -> None:
    """Run a pipeline file: validate every step's params first, then run the steps in order."""
    from dsk.pipeline import print_summary, run_pipeline

    console.set_mode(quiet=quiet, json_output=json_)
    if overrides is not None:
        from dsk.tune import load_override_file

        set_ = [*load_override_file(overrides), *set_]
    report = run_pipeline(pipeline, overrides=set_, until=until, force=force)
    if json_:
        console.print_json(report)
    else:
        print_summary(report)
