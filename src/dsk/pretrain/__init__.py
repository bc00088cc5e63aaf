"""`dsk pretrain`: train a DeepSeek-style (MLA + MoE) language model from scratch on token shards.

    $ dsk featurize && dsk pretrain --preset tiny --max-steps 200
    $ dsk pretrain --resume          # continue a killed run of the same settings
    $ dsk pretrain --preset gpt2 --precision bf16 --compile --nproc 2    # 2 GPUs through torchrun
"""

from dsk.pretrain.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None, resume=False, nproc=1, strategy="ddp",
        comm_hook="none"):
    from dsk.pretrain.stage import run as _run

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store, resume=resume,
                nproc=nproc, strategy=strategy, comm_hook=comm_hook)
