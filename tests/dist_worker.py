"""One process of a tests/test_distributed.py run: dsk.train.train on a tiny MoE model.

Started by torchrun (several ranks, gloo) or plainly (one process); rank 0 writes the run's
metrics.jsonl under --run-dir and the final full weights to --out.

    $ torchrun --standalone --nproc-per-node 2 tests/dist_worker.py --tokens T --run-dir R --out W.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--comm-hook", default="none")
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume-from", default="")
    args = ap.parse_args()

    from safetensors.torch import save_file

    from dsk.models import ModelConfig, Transformer
    from dsk.train import TokenData, TrainConfig, distributed, train

    info = distributed.env_info()
    data = TokenData.open(args.tokens, context=32, batch_size=4, seed=0, eval_tokens=1024)
    if info.enabled:
        data = data.shard(info.rank, info.world)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=data.vocab_size, max_seq_len=32, bias_update_speed=0.01))
    cfg = TrainConfig(max_steps=args.max_steps, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1,
                      checkpoint_every=args.checkpoint_every, checkpoint_every_minutes=0.0, keep_checkpoints=5,
                      device="cpu", threads=1, strategy=args.strategy, comm_hook=args.comm_hook)
    train(model, data, cfg, run_dir=Path(args.run_dir), resume_from=Path(args.resume_from) if args.resume_from else None,
          run_fingerprint={"test": "distributed"})
    if info.enabled and args.strategy == "fsdp":
        model = distributed.full_model(model, info)
    if info.is_main:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
        save_file(state, args.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
