"""`dsk clean` stage wiring: detect the data kind, build the artifact, print the summary.

    $ dsk clean data/sample/tinyshakespeare.txt
    $ dsk clean data/sample/breast_cancer.csv --label diagnosis
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk import console
from dsk.artifacts import Artifact, RawInput, Store
from dsk.clean.params import Params
from dsk.errors import DskError
from dsk.runtime import StageContext, StageResult, resolve_inputs, run_stage

STAGE_VERSION = "1"  # bump when the same params give different bytes
TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl"}
TABLE_SUFFIXES = {".csv", ".tsv"}


def _parquet_has_text(f: Path, field: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(f)
    except Exception:  # corrupt parquet: let the reader report it
        return False
    return field in schema.names and pa.types.is_string(schema.field(field).type) or (
        field in schema.names and pa.types.is_large_string(schema.field(field).type))


def detect_kind(path: Path, params: Params) -> str:
    if params.kind != "auto":
        return params.kind
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    kinds = set()
    for f in files:
        suffix = f.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            kinds.add("text")
        elif suffix in TABLE_SUFFIXES:
            kinds.add("table")
        elif suffix == ".parquet":
            kinds.add("text" if _parquet_has_text(f, params.text_field) else "table")
    if not kinds:
        raise DskError(f"cannot tell the data kind of {str(path)!r} (no .txt/.jsonl/.csv/.parquet files); pass --kind text|table")
    if len(kinds) > 1:
        raise DskError(f"{str(path)!r} mixes text and table files; clean them separately or pass --kind")
    return kinds.pop()


def run(*, source: Any = None, params: Params, seed: int = 0, force: bool = False, store: Store | None = None) -> StageResult:
    store = store or Store.open()
    inputs = resolve_inputs(store, "clean", source)
    inp = inputs[0]
    if isinstance(inp, Artifact):
        raise DskError(f"clean reads raw data, not artifacts: {inp.key}; pass a file or directory path")
    kind = detect_kind(inp.path, params)
    if kind == "table" and params.label is None and params.label_issues != "off":
        pass  # no label: label issues simply do not apply
    if kind == "text" and params.label is not None:
        raise DskError("--label applies to tables; this input is text (pass --kind table if it is a table)")

    def build(ctx: StageContext) -> None:
        from dsk.clean.table import clean_table
        from dsk.clean.text import clean_text

        store.ensure_writable()
        report = clean_text(ctx, inp.path) if kind == "text" else clean_table(ctx, inp.path)
        (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
        ctx.kind = kind
        if kind == "text":
            ctx.metrics = {k: report[k] for k in ("input_documents", "kept_documents", "rejected_documents",
                                                  "kept_char_fraction", "rejects_by_reason", "pii_redactions",
                                                  "duplicate_cluster_sizes")}
            ctx.key_metric = "kept_char_fraction"
            ctx.log.info(f"kept {report['kept_documents']:,}/{report['input_documents']:,} documents, "
                         f"{report['kept_char_fraction']:.1%} of the characters")
        else:
            ctx.metrics = {k: report[k] for k in ("input_rows", "kept_rows", "rejected_rows", "rejects_by_reason")}
            ctx.metrics["label_column"] = report["label_column"]
            ctx.metrics["kept_fraction"] = round(report["kept_rows"] / report["input_rows"], 6)
            ctx.key_metric = "kept_fraction"
            ctx.log.info(f"kept {report['kept_rows']:,}/{report['input_rows']:,} rows")
        print_summary(report)

    return run_stage(stage="clean", params=params, inputs=inputs, build=build, seed=seed, force=force,
                     store=store, kind=kind, stage_version=STAGE_VERSION)


def print_summary(report: dict[str, Any]) -> None:
    """Rich tables: counts per reason and the duplicate cluster-size histogram."""
    if console.is_quiet():
        return
    from rich.table import Table

    unit = "documents" if report["kind"] == "text" else "rows"
    n_in = report[f"input_{unit}"]
    t = Table(title=f"clean: {report[f'kept_{unit}']:,} of {n_in:,} {unit} kept", title_justify="left")
    t.add_column("outcome")
    t.add_column(unit, justify="right")
    t.add_column("share", justify="right")
    t.add_row("[green]kept[/green]", f"{report[f'kept_{unit}']:,}", f"{report[f'kept_{unit}'] / n_in:.1%}")
    for reason, n in sorted(report["rejects_by_reason"].items(), key=lambda kv: -kv[1]):
        t.add_row(reason, f"{n:,}", f"{n / n_in:.1%}")
    console.console.print(t)
    if report["kind"] == "text":
        console.console.print(f"characters kept: {report['kept_char_fraction']:.2%}")
        hist = report["duplicate_cluster_sizes"]
        if hist:
            h = Table(title="duplicate clusters by size", title_justify="left")
            h.add_column("size", justify="right")
            h.add_column("clusters", justify="right")
            h.add_column("", justify="left")
            top = max(hist.values())
            for size, n in hist.items():
                h.add_row(size, f"{n:,}", "█" * max(1, round(30 * n / top)))
            console.console.print(h)
        if report["pii_redactions"]:
            console.console.print("PII redacted: " + ", ".join(f"{k} {v}" for k, v in report["pii_redactions"].items()))
    else:
        li = report.get("label_issues") or {}
        if "flagged" in li:
            console.console.print(f"label issues flagged: {li['flagged']} (out-of-fold accuracy {li['oof_accuracy']:.3f})")
