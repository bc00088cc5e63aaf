"""`dsk train --stage pretrain|finetune ...`: an alias of `dsk pretrain` / `dsk finetune`.

    $ dsk train --stage pretrain --max-steps 10
"""

from __future__ import annotations

import typer

STAGES = ("pretrain", "finetune")


def train(
    ctx: typer.Context,
    stage: str = typer.Option(..., "--stage", help="Which training stage: pretrain or finetune."),
) -> None:
    """Train: alias of `dsk pretrain` and `dsk finetune` (other options pass through)."""
    from dsk.errors import DskError

    if stage not in STAGES:
        raise DskError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    group = ctx.parent.command  # type: ignore[union-attr]
    target = group.get_command(ctx.parent, stage)  # type: ignore[union-attr,arg-type]
    target.main(args=list(ctx.args), prog_name=f"dsk {stage}", standalone_mode=False)
