"""dsk's training machinery (a library; `dsk pretrain` and `dsk finetune` are its callers).

    >>> from dsk.train import TokenData, TrainConfig, train
    >>> data = TokenData.open(".dsk/artifacts/featurize/<id>", context=256, batch_size=16, seed=0)
    >>> result = train(model, data, TrainConfig(max_steps=500, lr=2e-3), run_dir=Path("run"))

Importing this package imports torch.
"""

from dsk.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from dsk.train.data import TokenData, read_token_meta
from dsk.train.loop import TrainConfig, TrainResult, autocast_context, evaluate, max_violation, pick_device, train
from dsk.train.optim import Lion, lr_at, make_optimizer, param_groups

__all__ = [
    "TokenData", "read_token_meta", "TrainConfig", "TrainResult", "train", "evaluate", "pick_device",
    "autocast_context", "max_violation", "Lion", "lr_at", "make_optimizer", "param_groups",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
]
