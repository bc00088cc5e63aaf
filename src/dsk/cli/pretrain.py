"""`dsk pretrain`: options come from `dsk.pretrain`'s params schema; the work is `dsk.pretrain.run`.

    $ dsk pretrain --help
    $ dsk pretrain --resume          # continue a killed run of the same settings
    $ dsk pretrain --nproc 2         # two GPUs (or CPU processes) through torchrun
"""

import inspect

import typer

from dsk.cli.common import stage_command


def _extra() -> list[inspect.Parameter]:
    # not params: they must not change the artifact id (resuming, or training the same global
    # batch on another number of processes, yields the same artifact up to float rounding)
    def option(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    return [
        option("resume", bool, typer.Option(False, "--resume", help="Continue a killed run with the same settings from its last checkpoint.")),
        option("nproc", int, typer.Option(1, "--nproc", min=1, help="Processes (GPUs) to train on; >1 relaunches through torchrun. --batch-size is the global batch, split over them.")),
        option("strategy", str, typer.Option("ddp", "--strategy", help="With several processes: ddp (replicas) or fsdp (FSDP2, sharded weights and optimizer; checkpoints via torch.distributed.checkpoint).")),
        option("comm_hook", str, typer.Option("none", "--comm-hook", help="DDP gradient compression: none, bf16, fp16 or powersgd.")),
    ]


command = stage_command("pretrain", extra=_extra)
