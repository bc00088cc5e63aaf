"""`dsk finetune`: LoRA / full instruction tuning with prompt-loss masking, adapter merging, and DPO.

    $ dsk finetune --data data/sample/tasks/train.jsonl                 # LoRA on the latest pretrain
    $ dsk finetune --data data/sample/tasks/train.jsonl --merge         # adapters folded in
    $ dsk finetune --data data/sample/tasks/preferences.jsonl --method dpo   # on the latest finetune
    $ dsk finetune --show-template
"""

from dsk.finetune.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None, resume=False, show_template=False):
    from dsk.finetune.stage import run as _run

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store, resume=resume,
                show_template=show_template)
