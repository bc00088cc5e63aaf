"""`dsk eval` orchestration: resolve what is evaluated, key the run, compare several artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from dsk import console
from dsk.artifacts import Artifact, Store, hash_raw_input
from dsk.errors import DskError
from dsk.evaluate import Params
from dsk.runtime import StageResult, resolve_inputs, run_stage

LM_KINDS = {"model", "export"}
TABLE_KINDS = {"table-model", "table-onnx"}
STAGE_VERSION = "1"


def _heldout_tasks(store: Store, art: Artifact) -> Path | None:
    """heldout.jsonl beside the finetuning data of the nearest finetune artifact in the lineage."""
    stack, seen = [art], set()
    while stack:
        a = stack.pop()
        if a.id in seen:
            continue
        seen.add(a.id)
        data = a.params.get("data") if a.stage == "finetune" else None
        if data:
            candidate = Path(data).with_name("heldout.jsonl")
            if candidate.is_file() and a.params.get("method") != "dpo":
                return candidate
        stack.extend(p for p in (store.find_by_id(i) for i in a.input_ids) if p is not None)
    return None


def run(*, source: Any, params: Params, seed: int, force: bool, store: Store | None) -> StageResult:
    store = store or Store.open()
    inputs = resolve_inputs(store, "eval", source)
    art = inputs[0]
    if not isinstance(art, Artifact):
        raise DskError("dsk eval evaluates a model artifact; pass its id, tag or path")
    if art.kind not in LM_KINDS | TABLE_KINDS:
        raise DskError(f"{art.stage}:{art.id} is a {art.kind!r} artifact, not a model; "
                       "evaluate a pretrain/finetune/quantize/export artifact")
    if art.kind == "export" and art.params.get("format") not in (None, "onnx"):
        raise DskError(f"{art.stage}:{art.id} is a {art.params.get('format')!r} export; evaluate its source model "
                       "(or an ONNX export) instead")
    extra = []
    if art.kind in LM_KINDS:
        tasks = Path(params.tasks) if params.tasks else _heldout_tasks(store, art)
        if params.tasks and not tasks.is_file():
            raise DskError(f"tasks file {params.tasks!r} does not exist")
        if tasks is not None and params.task_examples:
            extra.append(hash_raw_input(tasks))
            params = params.model_copy(update={"tasks": str(tasks)})
    elif params.data:
        extra.append(hash_raw_input(params.data))
    return run_stage(stage="eval", params=params, inputs=[art, *extra], build="dsk.evaluate.build:build",
                     seed=seed, force=force, store=store, stage_version=STAGE_VERSION)


def compare(*, refs: list[str], params: Params, seed: int, force: bool, store: Store | None) -> None:
    """Evaluate each artifact (eval artifacts are shown as they are) and print them side by side."""
    store = store or Store.open()
    columns: list[tuple[str, dict[str, Any]]] = []
    for ref in refs:
        art = store.resolve(ref)
        if art.stage != "eval":
            art = run(source=ref, params=params, seed=seed, force=force, store=store).artifact
        source = store.find_by_id(art.input_ids[0]) if art.input_ids else None
        label = f"{source.stage}:{source.id}" if source else art.id
        columns.append((label, art.metrics))
    keys = [k for k in ("val_loss", "perplexity", "bpb", "exact_match", "roc_auc", "accuracy", "f1",
                        "size_bytes", "decode_tokens_per_s") if any(k in m for _, m in columns)]
    keys += sorted({k for _, m in columns for k, v in m.items() if isinstance(v, (int, float)) and k not in keys})
    if console.is_quiet() and console._state["json"]:
        console.print_json({label: metrics for label, metrics in columns})
        return None
    table = Table(title="dsk eval --compare", title_justify="left")
    table.add_column("metric")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for key in keys:
        row = []
        for _, m in columns:
            v = m.get(key)
            row.append(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
        table.add_row(key, *row)
    console.console.print(table)
    return None
