"""`dsk augment` implementation: validate everything, then write originals + seeded variants.

Text (input: a clean `text` artifact) -> `documents.parquet` (clean's columns plus
`source_doc_id`, `ops`, `aug_seed`, `variant`), `rejects.parquet`, `report.json`.
Images / time series (input: a raw .npz/.npy or a PNG folder) -> `x.npy`, `y.npy` (when there
are labels), `provenance.parquet`, `report.json`. See docs/augment.md.

    $ dsk augment clean:latest --copies 2
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dsk import console
from dsk.artifacts import Artifact, RawInput, Store
from dsk.augment.params import Params
from dsk.data.augment_ops import Augmenter, compose, parse_ops
from dsk.config import load_yaml_file
from dsk.errors import DskError
from dsk.runtime import StageContext, resolve_inputs, run_stage

STAGE_VERSION = "1"
DEFAULT_OPS = {
    "text": [{"type": "EDA", "params": {"synonym_replacement": 0.1, "random_insertion": 0.1,
                                        "random_swap": 0.1, "random_deletion": 0.1}}],
    "image": [{"type": "RandomRotation", "params": {"degrees": 15}}, {"type": "HorizontalFlip", "p": 0.5},
              {"type": "GaussianNoise", "params": {"sigma": 0.03}}],
    "series": [{"type": "Jitter"}, {"type": "MagnitudeScaling"}, {"type": "TimeWarp"}],
}
IMAGE_KEYS, LABEL_KEYS = ("x", "images", "X", "data"), ("y", "labels", "targets", "target")


def variant_seed(seed: int, *parts: int) -> int:
    """A stable seed for one variant (or batch): the same on every machine and run.

    52 bits, so it survives a trip through float64 (pandas turns a nullable int column into
    floats) and JSON readers that parse numbers as doubles.
    """
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 12


# --------------------------------------------------------------------------- inputs


def _load_ops(params: Params) -> Params:
    """Inline an ops file so its content (not its path) is part of the cache key."""
    if not isinstance(params.ops, str):
        return params
    ops = load_yaml_file(params.ops, what="ops file", yaml_kind="JSON/YAML",
                         hint="pass a JSON/YAML list of {type, params, p}")
    if isinstance(ops, dict) and "ops" in ops:
        ops = ops["ops"]
    parse_ops(ops, where=f"ops file {params.ops}")
    return params.model_copy(update={"ops": ops})


def load_arrays(raw: RawInput) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, str]:
    """(x, y, class names, source format) from a .npz/.npy file or a folder of PNGs."""
    import zipfile

    try:
        return _load_arrays(raw)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        # object arrays (allow_pickle=False), truncated or non-numpy files
        raise DskError(f"cannot read {str(raw.path)!r} as numeric arrays: {str(exc).splitlines()[0]}") from None


def _load_arrays(raw: RawInput) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, str]:
    path = raw.path
    if path.is_dir():
        return _load_pngs(raw)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, None, "npy"
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            xkey = next((k for k in IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if xkey is None:
                raise DskError(f"{str(path)!r}: no array named {' / '.join(IMAGE_KEYS)}; found {', '.join(keys)}")
            ykey = next((k for k in LABEL_KEYS if k in keys), None)
            x = z[xkey]
            y = z[ykey] if ykey else None
        if y is not None and len(y) != len(x):
            raise DskError(f"{str(path)!r}: {len(x)} examples but {len(y)} labels; they must match")
        return x, y, None, "npz"
    raise DskError(
        f"augment reads a clean text artifact, a .npz/.npy array or a folder of PNGs; got {str(path)!r}. "
        f"For raw text run `dsk clean {path}` first"
    )


def _load_pngs(raw: RawInput) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, str]:
    from PIL import Image

    files = [f for f in raw.files if f.suffix.lower() == ".png"]
    if not files:
        raise DskError(f"{str(raw.path)!r} has no .png files; put images in it (class subfolders give labels)")
    rel = [f.relative_to(raw.path) for f in files]
    labelled = all(len(r.parts) == 2 for r in rel)
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB" if im.mode not in ("L", "I;16") else "L")))
    if len({im.shape for im in images}) > 1:
        raise DskError(f"{str(raw.path)!r}: images differ in size; resize them to one size first")
    x = np.stack(images)
    if not labelled:
        return x, None, None, "png"
    classes = sorted({r.parts[0] for r in rel})
    y = np.array([classes.index(r.parts[0]) for r in rel], dtype=np.int64)
    return x, y, classes, "png"


def _guess_modality(x: np.ndarray, requested: str, fmt: str) -> str:
    if requested != "auto":
        return requested
    if fmt == "png":
        return "image"
    if x.ndim == 4:
        return "image"
    if x.ndim == 2:
        return "series"
    raise DskError(f"array of shape {x.shape} could be images [N,H,W] or series [N,T,C]; pass --modality image or series")


def _images_to_nchw(x: np.ndarray) -> tuple[np.ndarray, str]:
    if x.ndim == 3:
        return x[:, None], "NHW"
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        return np.moveaxis(x, -1, 1), "NHWC"
    raise DskError(f"images must be [N,H,W] or [N,H,W,C] with C in 1/3/4; got shape {x.shape}")


# --------------------------------------------------------------------------- run


def run(*, source: Any = None, params: Params, seed: int = 0, force: bool = False, store: Store | None = None):
    store = store or Store.open()
    inputs = resolve_inputs(store, "augment", source)
    src = inputs[0]
    params = _load_ops(params)

    # everything that can be wrong is checked here, before any artifact is started
    if isinstance(src, Artifact):
        if params.modality not in ("auto", "text") or src.kind != "text":
            raise DskError(
                f"augment reads text artifacts ({src.key} is kind {src.kind or '?'!r}); "
                "pass images/series as a .npz/.npy path or a PNG folder"
            )
        if not (src.path / "documents.parquet").is_file():
            raise DskError(f"{src.key} has no documents.parquet; rerun `dsk clean`")
        modality = "text"
        data = None
    else:
        data = load_arrays(src)
        modality = _guess_modality(data[0], params.modality, data[3])
        if modality == "text":
            raise DskError("raw text goes through `dsk clean` first; then run `dsk augment` on its artifact")
    ops = params.ops if params.ops is not None else DEFAULT_OPS[modality]
    augmenter = compose(ops, modality=modality, synonyms=params.synonyms, text_format=params.text_format)
    if modality == "image":
        x, y, _, _ = data
        _images_to_nchw(x)
        if augmenter.needs_labels and y is None:
            mixers = ", ".join(s.op.name for s in augmenter.specs if s.op.needs_labels)
            raise DskError(f"{mixers} mixes labels but {str(src.path)!r} has none; add a 'y' array or drop {mixers}")
    if modality == "series" and data[0].ndim not in (2, 3):
        raise DskError(f"time series must be [N,T] or [N,T,C]; got shape {data[0].shape}")
    if modality != "text" and len(data[0]) == 0:
        raise DskError(f"{str(src.path)!r} holds no examples")

    def build(ctx: StageContext) -> None:
        if modality == "text":
            _build_text(ctx, augmenter, params)
        else:
            _build_arrays(ctx, augmenter, params, modality, data)

    result = run_stage(stage="augment", params=params, inputs=inputs, build=build, seed=seed,
                       force=force, store=store, stage_version=STAGE_VERSION)
    if not result.cached:
        print_summary(result.artifact.metrics)
    return result


def print_summary(m: dict[str, Any]) -> None:
    if console.is_quiet():
        return
    from rich.table import Table

    table = Table(title=f"augment ({m['modality']})", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("ops", ", ".join(m["op_types"]))
    table.add_row("examples", f"{m['n_input']:,} in -> {m['n_original']:,} originals + {m['n_augmented']:,} variants"
                  f" ({m['copies']} per example)")
    if m.get("n_rejected"):
        table.add_row("rejected", f"{m['n_rejected']:,} variants identical to their source (rejects.parquet)")
    if "docs_per_s" in m:
        table.add_row("speed", f"{m['docs_per_s']:,.0f} documents/s")
    if "shape" in m:
        table.add_row("output", f"x {m['shape']} ({m['layout']})" + (", soft labels" if m["soft_labels"] else ""))
    console.console.print(table)


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", write_statistics=False)


def _build_text(ctx: StageContext, aug: Augmenter, params: Params) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = pq.read_table(ctx.input.path / "documents.parquet").to_pylist()
    started = time.perf_counter()
    next_id = max((d["doc_id"] for d in docs), default=-1) + 1
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    with console.progress_task("augmenting text", len(docs)) as advance:
        for d in docs:
            if params.keep_originals:
                rows.append({**d, "source_doc_id": d["doc_id"], "ops": "[]", "aug_seed": None, "variant": 0})
            for v in range(1, params.copies + 1):
                s = variant_seed(ctx.seed, d["doc_id"], v)
                out = aug(d["text"], seed=s)
                ops = json.dumps(out.ops, sort_keys=True)
                if out.output == d["text"]:
                    # an unchanged copy is a duplicate, not a variant
                    rejects.append({"source_doc_id": d["doc_id"], "variant": v, "aug_seed": s,
                                    "ops": ops, "reason": "identical to its source"})
                    continue
                rows.append({"doc_id": next_id, "text": out.output, "source": d.get("source", ""),
                             "line": d.get("line", 0), "source_doc_id": d["doc_id"], "ops": ops,
                             "aug_seed": s, "variant": v})
                next_id += 1
            advance()
    seconds = time.perf_counter() - started
    schema = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string()),
                        ("line", pa.int64()), ("source_doc_id", pa.int64()), ("ops", pa.string()),
                        ("aug_seed", pa.int64()), ("variant", pa.int32())])
    _write_parquet(pa.Table.from_pylist(rows, schema=schema), ctx.out / "documents.parquet")
    reject_schema = pa.schema([("source_doc_id", pa.int64()), ("variant", pa.int32()), ("aug_seed", pa.int64()),
                               ("ops", pa.string()), ("reason", pa.string())])
    _write_parquet(pa.Table.from_pylist(rejects, schema=reject_schema), ctx.out / "rejects.parquet")
    n_aug = sum(1 for r in rows if r["variant"] > 0)
    n_orig = len(rows) - n_aug
    ctx.kind = "text"
    ctx.metrics.update({
        "modality": "text", "n_input": len(docs), "n_original": n_orig, "n_augmented": n_aug,
        "n_rejected": len(rejects), "n_documents": len(rows), "copies": params.copies,
        "op_types": [s.op.name for s in aug.specs], "docs_per_s": round(len(docs) * params.copies / max(seconds, 1e-9), 1),
    })
    ctx.key_metric = "n_documents"
    _write_report(ctx, aug)
    ctx.log.info(f"{len(docs)} documents -> {n_orig} originals + {n_aug} variants ({len(rejects)} unchanged, rejected)")


def _build_arrays(ctx: StageContext, aug: Augmenter, params: Params, modality: str, data: tuple) -> None:
    import pyarrow as pa
    import torch

    x, y, classes, fmt = data
    n = len(x)
    layout = "NTC" if modality == "series" else ""
    if modality == "image":
        nchw, layout = _images_to_nchw(x)
        is_int = np.issubdtype(x.dtype, np.integer)
        scale = float(np.iinfo(x.dtype).max) if is_int else 1.0
        work = torch.from_numpy(np.ascontiguousarray(nchw)).float() / scale
        labels = None
        if y is not None and aug.needs_labels:
            from dsk.data.augment_image import one_hot

            labels = one_hot(np.asarray(y)) if np.asarray(y).ndim == 1 else torch.as_tensor(np.asarray(y)).float()
    else:
        work = x.astype(np.float32 if x.dtype != np.float64 else np.float64)

    outs, ys, prov = [], [], []
    if params.keep_originals:
        outs.append(x)
        if y is not None:
            ys.append(labels.numpy() if modality == "image" and labels is not None else y)
        prov += [{"index": i, "source_index": i, "variant": 0, "ops": "[]", "aug_seed": None} for i in range(n)]
    n_batches = -(-n // params.batch_size)
    with console.progress_task(f"augmenting {modality}", n_batches * params.copies) as advance:
        for v in range(1, params.copies + 1):
            parts, yparts = [], []
            for start in range(0, n, params.batch_size):
                stop = min(start + params.batch_size, n)
                s = variant_seed(ctx.seed, v, start)
                if modality == "image":
                    out = aug(work[start:stop], None if labels is None else labels[start:stop], seed=s)
                    img = out.output.permute(0, 2, 3, 1).numpy() if layout == "NHWC" else out.output[:, 0].numpy()
                    if is_int:  # back to the input's integer range
                        img = np.clip(np.rint(img * scale), 0, scale).astype(x.dtype)
                    else:
                        img = img.astype(x.dtype, copy=False)
                    parts.append(img)
                    if out.labels is not None:
                        yparts.append(out.labels.numpy())
                else:
                    out = aug(work[start:stop], seed=s)
                    parts.append(out.output.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32))
                for i, ops in enumerate(out.ops):
                    for op in ops:  # batch-local partner index -> index of the source example
                        if "partner" in op:
                            op["partner"] += start
                    prov.append({"index": 0, "source_index": start + i, "variant": v,
                                 "ops": json.dumps(ops, sort_keys=True), "aug_seed": s})
                advance()
            outs.append(np.concatenate(parts))
            if y is not None:
                ys.append(np.concatenate(yparts) if yparts else y)
    x_out = np.concatenate(outs)
    for i, row in enumerate(prov):
        row["index"] = i
    np.save(ctx.out / "x.npy", x_out, allow_pickle=False)
    if y is not None:
        np.save(ctx.out / "y.npy", np.concatenate(ys), allow_pickle=False)
    schema = pa.schema([("index", pa.int64()), ("source_index", pa.int64()), ("variant", pa.int32()),
                        ("ops", pa.string()), ("aug_seed", pa.int64())])
    _write_parquet(pa.Table.from_pylist(prov, schema=schema), ctx.out / "provenance.parquet")
    ctx.kind = modality
    n_aug = len(x_out) - (n if params.keep_originals else 0)
    ctx.metrics.update({
        "modality": modality, "n_input": n, "n_original": n if params.keep_originals else 0,
        "n_augmented": n_aug, "n_rejected": 0, "n_examples": len(x_out), "copies": params.copies,
        "op_types": [s.op.name for s in aug.specs], "shape": list(x_out.shape), "layout": layout,
        "source_format": fmt, "soft_labels": bool(y is not None and aug.needs_labels),
        "classes": classes,
    })
    ctx.key_metric = "n_examples"
    _write_report(ctx, aug)
    ctx.log.info(f"{n} {modality} examples -> {len(x_out)} rows ({n_aug} variants)")


def _write_report(ctx: StageContext, aug: Augmenter) -> None:
    report = {"ops": aug.to_json(), **ctx.metrics}
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
