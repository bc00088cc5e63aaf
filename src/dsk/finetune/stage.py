"""`dsk finetune` build: check the base model and the data, add adapters, train, score, write.

The base model (the stage input: latest pretrain artifact by default; for ``--method dpo``
the latest finetune artifact, i.e. the SFT model) is loaded with any adapters it carries
folded in. LoRA freezes it and trains adapters; ``full`` trains every weight; ``dpo`` trains
adapters (or every weight, ``--dpo-train full``) against a frozen copy of the input model.
Training is :func:`dsk.train.train`, the loop `dsk pretrain` uses (precision, accumulation,
checkpoints, ``--resume``); DPO plugs in through its ``loss_fn`` hook.

Unmerged LoRA artifacts hold the base weights in ``model.safetensors`` plus
``adapter.safetensors``/``adapter_config.json``; :func:`dsk.models.load_model` folds the
adapters in, so downstream stages load either kind the same way.

    $ dsk finetune --data data/sample/tasks/train.jsonl --max-steps 100
    $ dsk finetune --data data/sample/tasks/preferences.jsonl --method dpo --beta 0.1
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dsk import console
from dsk.artifacts import Artifact, RawInput, Store, hash_raw_input
from dsk.errors import DskError
from dsk.finetune.params import Params
from dsk.runtime import StageContext, resolve_inputs, run_stage

STAGE_VERSION = "2"
TEXT_MODEL_FILES = ("config.json", "model.safetensors")


def resolve_base(store: Store, source, method: str) -> Artifact:
    """The model to finetune: explicit, else (dpo) the latest finetune or (sft) the latest pretrain."""
    if source is None or str(source) == "":
        order = ["finetune", "pretrain"] if method == "dpo" else ["pretrain"]
        art = store.latest_of(order)
        if art is None:
            raise DskError("no base model for finetune: run `dsk pretrain` first, or pass --from ID|PATH|TAG")
        return art
    [art] = resolve_inputs(store, "finetune", source)
    if not isinstance(art, Artifact):
        raise DskError(f"{str(source)!r} is not an artifact; pass a model artifact id, tag or path")
    return art


def check_base(art: Artifact) -> None:
    """A base must be a dsk language model with a chat-capable tokenizer."""
    missing = [f for f in TEXT_MODEL_FILES if not (art.path / f).is_file()]
    if art.kind != "model" or missing:
        what = f"a {art.kind or 'non-model'!r} artifact from `dsk {art.stage}`"
        raise DskError(f"finetune needs a language model (a `dsk pretrain` or `dsk finetune` artifact); "
                       f"{art.id} is {what}")
    try:
        cfg = json.loads((art.path / "config.json").read_text())
    except json.JSONDecodeError:
        raise DskError(f"{art.id}: config.json is not valid JSON; the artifact is damaged") from None
    if cfg.get("model_type") != "dsk-deepseek" or "vocab_size" not in cfg:
        raise DskError(f"{art.id} is not a dsk language model (model_type {cfg.get('model_type')!r}); "
                       f"finetune a `dsk pretrain` artifact")
    if not (art.path / "tokenizer.json").is_file():
        raise DskError(f"base model {art.id} has no tokenizer.json, so chats cannot be encoded; "
                       f"pretrain it from a `dsk featurize` artifact")


def run(*, source=None, params: Params, seed: int = 0, force: bool = False, store: Store | None = None,
        resume: bool = False, show_template: bool = False):
    if show_template:
        from dsk.finetune.template import describe

        print(describe())  # the answer the user asked for: stdout, not the log console
        return None
    store = store or Store.open()
    if source is not None and Path(str(source)).is_file():
        raise DskError(
            f"finetune's INPUT is the base model artifact, not a data file ({str(source)!r}); "
            f"pass the data with --data {source}"
        )
    if not params.data:
        raise DskError("finetune needs training data: pass --data PATH to a JSONL file "
                       "(e.g. --data data/sample/tasks/train.jsonl; see `dsk finetune --show-template`)")
    unused = params.unused_lora_options()
    if unused:
        raise DskError(f"{', '.join(unused)} only {'apply' if len(unused) > 1 else 'applies'} to LoRA adapters, "
                       f"and --method {params.method}"
                       f"{' --dpo-train full' if params.method == 'dpo' else ''} trains every weight; "
                       f"drop {'them' if len(unused) > 1 else 'it'} or use --method lora")
    base = resolve_base(store, source, params.method)
    check_base(base)
    if params.method == "dpo" and base.stage != "finetune":
        console.warn(f"dpo on {base.stage} {base.id}: the reference is usually the SFT model (a finetune artifact)")
    data = hash_raw_input(params.data)
    if not data.path.is_file():
        raise DskError(f"--data {params.data!r} is a directory; pass one JSONL file")

    def build(ctx: StageContext) -> None:
        _build(ctx, params, base, data, resume=resume)

    return run_stage(stage="finetune", params=params, inputs=[base], extra_inputs=[data], build=build, seed=seed,
                     force=force, store=store, kind="model", stage_version=STAGE_VERSION)


def train_config(params: Params):
    from dsk.train import TrainConfig

    return TrainConfig(
        lr_mults={"lora_B": params.lora_plus_ratio} if params.uses_lora and params.lora_plus_ratio != 1 else {},
        max_steps=params.max_steps, batch_size=params.batch_size, grad_accum=params.grad_accum, lr=params.peak_lr(),
        min_lr_ratio=params.min_lr_ratio, warmup_steps=params.warmup_steps, weight_decay=params.weight_decay,
        grad_clip=params.grad_clip, optimizer=params.optimizer, precision=params.precision, device=params.device,
        eval_every=params.eval_every, log_every=params.log_every, checkpoint_every=params.checkpoint_every,
        checkpoint_every_minutes=params.checkpoint_every_minutes, keep_checkpoints=params.keep_checkpoints,
        max_minutes=params.max_minutes, threads=params.threads,
    )


def run_dir_for(store: Store, artifact_id: str) -> Path:
    return store.root / "runs" / "finetune" / artifact_id


def _build(ctx: StageContext, params: Params, base: Artifact, raw: RawInput, *, resume: bool) -> None:
    import copy

    import torch
    from safetensors.torch import save_file

    from dsk.data.tokenizer import load_tokenizer
    from dsk.finetune import data as fdata
    from dsk.evaluation.tasks import exact_match, preference_accuracy
    from dsk.finetune.template import describe
    from dsk.models import config_json, load_model, state_dict_for_save
    from dsk.models.lora import LoraConfig, add_lora, count_params, is_adapter_param, save_adapters
    from dsk.train import latest_checkpoint, train
    from dsk.train.plots import plot_curves

    data_path = raw.path
    # ---- 1. base model and tokenizer (adapters of an earlier finetune are folded in)
    model, _, cfg = load_model(base.path)
    tok = load_tokenizer(base.path)
    needed = [n for n in ("bos", "end", "user", "assistant", "system") if n not in tok.special]
    if needed:
        raise DskError(f"base model {base.id}'s tokenizer has no <|{needed[0]}|> token, so it cannot format chats; "
                       f"re-featurize with the current `dsk featurize`")
    if tok.vocab_size > cfg.vocab_size:
        raise DskError(f"base model {base.id}: tokenizer has {tok.vocab_size} tokens but the model only "
                       f"{cfg.vocab_size}; the artifact is inconsistent")
    context = params.context or cfg.max_seq_len
    if context > cfg.max_seq_len:
        raise DskError(f"--context {context} exceeds the base model's max_seq_len={cfg.max_seq_len}; "
                       f"use --context {cfg.max_seq_len} or less")
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eot_id

    # ---- 2. data: parse, template, mask, check lengths, split, pack (all before training)
    dpo = params.method == "dpo"
    kind = "preference" if dpo else "instruction"
    records, rejects = fdata.read_jsonl(data_path, kind=kind, bad_lines=params.bad_lines)
    if dpo:
        encoded = fdata.encode_preferences(records, tok, context=context, path=data_path,
                                           bad_lines=params.bad_lines, rejects=rejects)
    else:
        encoded = fdata.encode_instructions(records, tok, context=context, path=data_path,
                                            bad_lines=params.bad_lines, rejects=rejects)
    if not encoded:
        raise DskError(f"{data_path}: every example was rejected (see the reasons with --bad-lines fail)")
    train_set, val_set = fdata.split(encoded, params.val_fraction, ctx.seed)
    if dpo:
        data = fdata.PreferenceData.build(train_set, val_set, pad_id=pad_id, batch_size=params.batch_size,
                                          grad_accum=params.grad_accum, seed=ctx.seed)
        ctx.log.info(f"data: {len(train_set)} preference pairs for training, {len(val_set)} held out, "
                     f"{len(rejects)} rejected; rows of {data.context + 1} tokens")
    else:
        data = fdata.SFTData.build(train_set, val_set, context=context, pad_id=pad_id, packing=params.packing,
                                   batch_size=params.batch_size, grad_accum=params.grad_accum, seed=ctx.seed)
        ctx.log.info(f"data: {len(train_set)} examples in {data.n_train_rows} rows of {data.context + 1} tokens "
                     f"({'packed' if params.packing else 'one per row'}), {len(val_set)} held out, "
                     f"{len(rejects)} rejected")
    val_records = [e.record for e in val_set][: params.eval_examples] if not dpo else []
    val_pairs = list(val_set)[: params.eval_examples] if dpo else []

    # ---- 3. what trains: adapters on a frozen base, or everything; dpo's frozen reference
    torch.manual_seed(ctx.seed)
    use_lora = params.uses_lora
    reference = copy.deepcopy(model).eval() if dpo else None
    pref_before = preference_accuracy(model, val_pairs, pad_id=pad_id) if dpo and val_pairs else None
    lora_cfg = None
    speed = cfg.bias_update_speed
    if use_lora:
        chat_ids = sorted({tok.special[n] for n in ("bos", "system", "user", "assistant", "end")})
        lora_cfg = add_lora(model, LoraConfig(rank=params.lora_rank, alpha=params.lora_alpha, dropout=params.lora_dropout,
                                              targets=tuple(params.lora_targets), projections=tuple(params.lora_projections),
                                              dora=params.lora_dora, init_seed=ctx.seed,
                                              token_ids=chat_ids if params.lora_chat_tokens else []))
        # the router bias belongs to the frozen base: no aux-loss-free balancing updates under LoRA
        cfg.bias_update_speed = 0.0
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable, total = count_params(model)
    ctx.log.info(f"method {params.method}{' (' + params.dpo_train + ')' if dpo else ''}: "
                 f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
                 + (f", LoRA r={params.lora_rank} alpha={params.lora_alpha:g} on {', '.join(params.lora_targets)}"
                    + (f" ({', '.join(params.lora_projections)})" if params.lora_projections else "")
                    + (", DoRA" if params.lora_dora else "")
                    + (f", LoRA+ B lr x{params.lora_plus_ratio:g}" if params.lora_plus_ratio != 1 else "")
                    if use_lora else ""))

    run_dir = run_dir_for(ctx.store, ctx.artifact_id)
    resume_from = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and resume_from is None:
        console.warn(f"nothing to resume for these settings (no checkpoint in {run_dir}); starting from scratch")
    if resume_from is None and run_dir.exists():
        shutil.rmtree(run_dir)

    loss_fn = None
    if dpo:
        from dsk.finetune.dpo import DPOObjective

        loss_fn = DPOObjective(reference, params.beta)
    elif params.packing:
        loss_fn = fdata.PackedLoss(tok.bos_id)
    try:
        result = train(
            model, data, train_config(params), run_dir=run_dir, resume_from=resume_from, log=ctx.log, loss_fn=loss_fn,
            run_fingerprint={"base": base.id, "data": raw.sha256, "seed": ctx.seed,
                             "params": params.model_dump(mode="json")},
        )
    finally:
        cfg.bias_update_speed = speed
    model.cpu().eval()

    # ---- 4. score on held-out examples
    metrics: dict = {}
    if dpo:
        if val_pairs:
            metrics["val_pref_acc_before"] = pref_before
            metrics["val_pref_acc"] = preference_accuracy(model, val_pairs, pad_id=pad_id)
            ctx.log.info(f"held-out preference accuracy {pref_before:.3f} -> {metrics['val_pref_acc']:.3f} "
                         f"({len(val_pairs)} pairs)")
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"train"' in line]
        if last:
            for key in ("reward_margin", "reward_acc"):
                if key in last[-1]:
                    metrics[key] = last[-1][key]
    elif val_records:
        em, _ = exact_match(model, tok, val_records, max_new_tokens=params.max_new_tokens)
        metrics["val_exact_match"] = em
        ctx.log.info(f"held-out exact match {em:.3f} ({len(val_records)} examples, greedy)")

    # ---- 5. the artifact: plain model (full, merged) or base + adapters
    merged = False
    if use_lora and params.merge:
        from dsk.models.lora import merge_lora

        merge_lora(model)
        merged = True
    state = state_dict_for_save(model)
    save_file({k: v for k, v in state.items() if not is_adapter_param(k)}, str(ctx.out / "model.safetensors"),
              metadata={"format": "pt"})
    (ctx.out / "config.json").write_text(json.dumps(config_json(cfg), indent=2, sort_keys=True) + "\n")
    if use_lora and not merged:
        save_adapters(model, lora_cfg, ctx.out)
    shutil.copyfile(base.path / "tokenizer.json", ctx.out / "tokenizer.json")
    for name in ("metrics.jsonl", "timing.jsonl"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, ctx.out / name)
    plot_curves(ctx.out / "metrics.jsonl", ctx.out / "curves.png", title=f"finetune ({params.method}) {ctx.artifact_id}")
    (ctx.out / "rejects.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    info = {
        "base_model": {"id": base.id, "stage": base.stage, "path": str(base.path)},
        "base_lineage": [i.get("id") or i.get("sha256") for i in base.manifest.get("inputs", [])],
        "method": params.method, "merged": merged, "lora": lora_cfg.to_dict() if lora_cfg else None,
        "data": {"path": str(data_path), "kind": kind, "n_train": len(train_set), "n_val": len(val_set),
                 "n_rejected": len(rejects)},
        "trainable_params": trainable, "total_params": total,
        "template": describe(),
    }
    (ctx.out / "finetune.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)

    ctx.kind = "model"
    ctx.metrics.update({
        "base_model_id": base.id, "method": params.method, "merged": merged,
        "val_loss": _finite(result.val_loss), "val_bpb": _finite(result.val_bpb),
        "steps": result.steps, "train_seconds": result.seconds, "stopped_by": result.stopped_by,
        "device": result.device, "resumed_from_step": result.resumed_from_step,
        "trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total,
        "n_train_examples": len(train_set), "n_val_examples": len(val_set), "n_rejected": len(rejects),
        **metrics,
    })
    ctx.key_metric = "val_pref_acc" if dpo and val_pairs else ("val_exact_match" if val_records else "val_loss")


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
