"""`dsk pretrain` build: check the token shards and the config, train, write the model artifact.

In-progress checkpoints live outside the artifact store, in ``<workspace>/runs/pretrain/<id>/``
keyed by the id the artifact will get, so a killed run can be resumed with ``--resume`` and
the final artifact still appears atomically. The run directory is removed once the artifact
is written.

    $ dsk pretrain --preset tiny --max-steps 200 --checkpoint-every 50
    $ dsk pretrain --preset tiny --max-steps 200 --checkpoint-every 50 --resume

With ``--nproc N`` (or under ``torchrun``) every rank runs ``_build``'s training on its slice
of each batch; rank 0 alone goes through ``run_stage`` (cache, artifact, manifest) and tells
the other ranks, by a broadcast, when a build starts and when it is over.

    $ dsk pretrain --preset gpt2 --context 1024 --batch-size 64 --precision bf16 --compile --nproc 2
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

from dsk import console
from dsk.artifacts import Artifact, Store
from dsk.errors import DskError
from dsk.pretrain.params import Params
from dsk.runtime import StageContext, resolve_inputs, run_stage

STAGE_VERSION = "1"


def train_config(params: Params):
    from dsk.train import TrainConfig

    return TrainConfig(
        max_steps=params.max_steps, batch_size=params.batch_size, grad_accum=params.grad_accum, lr=params.lr,
        min_lr_ratio=params.min_lr_ratio, warmup_steps=params.warmup_steps, schedule_clock=params.schedule_clock,
        weight_decay=params.weight_decay, beta1=params.beta1, beta2=params.beta2, grad_clip=params.grad_clip,
        optimizer=params.optimizer, muon_lr_scale=params.muon_lr_scale, precision=params.precision, device=params.device, compile=params.compile,
        cuda_graphs=params.cuda_graphs,
        activation_checkpointing=params.activation_checkpointing, eval_every=params.eval_every,
        log_every=params.log_every, checkpoint_every=params.checkpoint_every,
        checkpoint_every_minutes=params.checkpoint_every_minutes, keep_checkpoints=params.keep_checkpoints,
        max_minutes=params.max_minutes, profile_steps=params.profile, threads=params.threads,
        bf16_residual=params.bf16_residual,
    )


def model_config(params: Params, vocab_size: int):
    from dsk.models import ModelConfig

    return ModelConfig.preset(params.preset, **{"vocab_size": vocab_size, "max_seq_len": params.context, **params.arch})


def run_dir_for(store: Store, artifact_id: str) -> Path:
    return store.root / "runs" / "pretrain" / artifact_id


def run(*, source=None, params: Params, seed: int = 0, force: bool = False, store: Store | None = None,
        resume: bool = False, nproc: int = 1, strategy: str = "ddp", comm_hook: str = "none"):
    from dsk.pretrain.launch import launch, world_size

    store = store or Store.open()
    dist_opts = {"strategy": strategy, "comm_hook": comm_hook}
    if strategy not in ("ddp", "fsdp") or comm_hook not in ("none", "bf16", "fp16", "powersgd"):
        raise DskError(f"--strategy {strategy!r} / --comm-hook {comm_hook!r}: use ddp|fsdp and none|bf16|fp16|powersgd")
    if strategy == "fsdp" and comm_hook != "none":
        raise DskError("--comm-hook is a DDP option (FSDP has its own reduce-scatter); drop it or use --strategy ddp")
    if nproc > 1 and world_size() == 1:
        if params.batch_size % nproc:
            raise DskError(f"--batch-size {params.batch_size} (the global batch) does not split over {nproc} "
                           f"processes; use a multiple of {nproc}")
        resolve_inputs(store, "pretrain", source)  # a missing input fails here, before any process starts
        launch(nproc=nproc, spec={"source": source, "params": params.model_dump(mode="json"), "seed": seed,
                                  "force": force, "resume": resume, "quiet": console.is_quiet(), **dist_opts},
               store_root=store.root)
        # rank 0 committed the artifact: look it up (a cache hit) and report it as built now
        result = run(source=source, params=params, seed=seed, store=store)
        return dataclasses.replace(result, cached=False)
    inputs = resolve_inputs(store, "pretrain", source)
    src = inputs[0]
    if isinstance(src, Artifact) and src.kind in ("table", "features"):  # issue 12: the table classifier
        from dsk.tabular.stage import run_pretrain

        return run_pretrain(inputs=inputs, params=params, seed=seed, force=force, store=store)
    if not isinstance(src, Artifact) or src.kind != "tokens":
        what = f"a {src.kind!r} artifact" if isinstance(src, Artifact) else "a raw path"
        raise DskError(f"pretrain reads a tokens artifact from `dsk featurize` on text, got {what}; run `dsk featurize` first")

    if world_size() > 1:
        return _run_ranked(store, params, src, inputs, seed=seed, force=force, resume=resume, dist_opts=dist_opts)

    def build(ctx: StageContext) -> None:
        _build(ctx, params, src, resume=resume, dist_opts=dist_opts)

    return run_stage(stage="pretrain", params=params, inputs=inputs, build=build, seed=seed, force=force,
                     store=store, kind="model", stage_version=STAGE_VERSION)


def _run_ranked(store: Store, params: Params, src: Artifact, inputs, *, seed, force, resume, dist_opts):
    """One rank under torchrun: rank 0 runs the stage; the others follow its broadcasts."""
    from dsk.train import distributed, pick_device

    info = distributed.init(pick_device(params.device))
    result = _follow_rank0(info, store, params, src, inputs, seed=seed, force=force, resume=resume,
                           dist_opts=dist_opts)
    # all ranks got here: leave the group before the interpreter's teardown (see shutdown). After a
    # failure the others may be inside a collective, so a failing rank just exits and torchrun stops them.
    distributed.shutdown()
    return result


def _follow_rank0(info, store: Store, params: Params, src: Artifact, inputs, *, seed, force, resume, dist_opts):
    import torch.distributed as dist

    def broadcast(message: dict | None) -> dict:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    if info.is_main:
        state = {"building": False}

        def build(ctx: StageContext) -> None:
            state["building"] = True
            broadcast({"build": ctx.artifact_id, "seed": ctx.seed})
            _build(ctx, params, src, resume=resume, dist_opts=dist_opts)
            state["building"] = False

        try:
            return run_stage(stage="pretrain", params=params, inputs=inputs, build=build, seed=seed, force=force,
                             store=store, kind="model", stage_version=STAGE_VERSION)
        finally:
            # a failure mid-training leaves the others in a collective: exit and let torchrun stop them
            if not state["building"]:
                broadcast({"done": True})
    console.set_mode(quiet=True)
    message = broadcast(None)
    if "build" in message:
        quiet_log = logging.getLogger(f"dsk.pretrain.rank{info.rank}")
        quiet_log.propagate = False
        quiet_log.addHandler(logging.NullHandler())
        ctx = SimpleNamespace(store=store, artifact_id=message["build"], seed=message["seed"], log=quiet_log,
                              out=None, metrics={}, kind=None, key_metric=None)
        _build(ctx, params, src, resume=resume, dist_opts=dist_opts)
        broadcast(None)
    return None


def _build(ctx: StageContext, params: Params, src: Artifact, *, resume: bool, dist_opts: dict | None = None) -> None:
    import torch

    from dsk.models import Transformer, save_model
    from dsk.train import TokenData, distributed, latest_checkpoint, train
    from dsk.train.plots import plot_curves

    # ---- inputs and config, all checked before any training
    tokenizer_path = src.path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise DskError(f"tokens artifact {src.id} has no tokenizer.json; rerun `dsk featurize --force`")
    data = TokenData.open(src.path, context=params.context, batch_size=params.batch_size, seed=ctx.seed,
                          eval_tokens=params.eval_tokens, repeat_fraction=params.repeat_fraction)
    cfg = model_config(params, data.vocab_size)
    tcfg = dataclasses.replace(train_config(params), **(dist_opts or {}))
    info = distributed.env_info()
    if info.enabled:  # each rank reads its own rows of every global batch
        data = data.shard(info.rank, info.world)

    run_dir = run_dir_for(ctx.store, ctx.artifact_id)
    resume_from = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and resume_from is None:
        console.warn(f"nothing to resume for these settings (no checkpoint in {run_dir}); starting from scratch")
    if resume_from is None and run_dir.exists() and info.is_main:
        shutil.rmtree(run_dir)
    if info.enabled:
        torch.distributed.barrier()

    torch.manual_seed(ctx.seed)
    model = Transformer(cfg)
    ctx.log.info(
        f"model: preset {params.preset}, {cfg.attn}, {cfg.n_layers} layers, dim {cfg.dim}, "
        f"{model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active), "
        f"vocab {cfg.vocab_size}, context {params.context}"
    )
    result = train(
        model, data, tcfg, run_dir=run_dir, resume_from=resume_from, log=ctx.log,
        run_fingerprint={"input": src.id, "seed": ctx.seed, "params": params.model_dump(mode="json")},
    )

    # ---- the artifact (rank 0; FSDP first gathers the full weights, a collective)
    if info.enabled and tcfg.strategy == "fsdp":
        model = distributed.full_model(model, info)
    if not info.is_main:
        return
    save_model(model.cpu(), ctx.out)
    shutil.copyfile(tokenizer_path, ctx.out / "tokenizer.json")
    for name in ("metrics.jsonl", "timing.jsonl", "profile_trace.json", "profile_ops.txt"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, ctx.out / name)
    plot_curves(ctx.out / "metrics.jsonl", ctx.out / "curves.png", title=f"pretrain {ctx.artifact_id}")
    shutil.rmtree(run_dir, ignore_errors=True)

    ctx.kind = "model"
    ctx.metrics.update({
        "val_loss": result.val_loss, "val_bpb": result.val_bpb, "steps": result.steps, "tokens": result.tokens,
        "train_seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "stopped_by": result.stopped_by,
        "device": result.device, "resumed_from_step": result.resumed_from_step,
        "n_params": model.num_params(), "n_active_params": model.num_params(active=True),
        "vocab_size": cfg.vocab_size, "context": params.context,
        **({"nproc": info.world, "strategy": tcfg.strategy, "comm_hook": tcfg.comm_hook} if info.enabled else {}),
    })
    ctx.key_metric = "val_bpb"
    ctx.log.info(
        f"trained {result.steps} steps ({result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s on "
        f"{result.device}): val loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits/byte"
    )
