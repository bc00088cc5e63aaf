"""Every `dsk quantize` scheme side by side: size vs fp32, perplexity change, decode tokens/s,
and torch eager vs onnxruntime (fp32 and int8) on the same model.

The model is the ``small`` preset (MLA + 16-expert MoE) trained on the sample corpus: the
paragraphs of data/sample/tinyshakespeare.txt become a text artifact, `dsk featurize` makes a
1024-token BPE and token shards, and a plain AdamW loop trains for ``--train-seconds`` (on a
GPU when there is one). Every row is a real `dsk quantize` / `dsk export` run, so the numbers
are the ones recorded in the artifacts' manifests.

    $ python benchmarks/quantize.py                      # small preset, 180 s of training
    $ python benchmarks/quantize.py --quick              # tiny preset, 20 s, few eval batches
    $ python benchmarks/quantize.py --threads 1          # decode timings on one core
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"
sys.path.insert(0, str(REPO / "src"))


def build_text(ctx) -> None:
    """The sample corpus as documents.parquet (one document per blank-line paragraph)."""
    import pandas as pd

    paragraphs = [p.strip() for p in SAMPLE.read_text().split("\n\n") if p.strip()]
    pd.DataFrame({
        "doc_id": range(len(paragraphs)), "text": paragraphs, "source": SAMPLE.name,
        "line": range(len(paragraphs)),
    }).to_parquet(ctx.out / "documents.parquet", index=False)
    ctx.kind = "text"
    ctx.metrics = {"documents": len(paragraphs)}


def make_train_build(args):
    def build_model(ctx) -> None:
        import numpy as np
        import torch

        from dsk.models import ModelConfig, Transformer, save_model

        torch.manual_seed(0)
        meta = json.loads((ctx.input.path / "meta.json").read_text())
        cfg = ModelConfig.preset(args.preset, vocab_size=meta["vocab_size"])
        device = args.device
        model = Transformer(cfg).to(device)
        train = np.fromfile(ctx.input.path / "train.bin", dtype=np.dtype(meta["dtype"])).astype(np.int64)
        context, batch = min(256, cfg.max_seq_len), args.batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        rng = np.random.default_rng(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        started, step, losses = time.perf_counter(), 0, []
        while time.perf_counter() - started < args.train_seconds and step < args.max_steps:
            # linear warmup, then cosine decay to 10% over max_steps
            progress = min(1.0, step / max(1, args.max_steps))
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for g in opt.param_groups:
                g["lr"] = lr
            starts = rng.integers(0, len(train) - context - 1, size=batch)
            xy = torch.from_numpy(np.stack([train[s : s + context + 1] for s in starts])).to(device)
            loss = model(xy[:, :-1], targets=xy[:, 1:]).loss  # fp32 (TF32 matmuls on a GPU)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.update_router_bias()
            losses.append(float(loss.detach()))
            step += 1
        save_model(model.cpu().eval(), ctx.out)
        tok = ctx.input.path / "tokenizer.json"
        if tok.is_file():
            (ctx.out / "tokenizer.json").write_bytes(tok.read_bytes())
        ctx.kind = "model"
        ctx.metrics = {"steps": step, "max_steps": args.max_steps, "train_seconds": args.train_seconds, "device": device,
                       "seconds": round(time.perf_counter() - started, 1), "lr": args.lr,
                       "batch_size": batch, "context": context, "final_train_loss": float(np.mean(losses[-20:])),
                       "params": model.num_params()}
        ctx.log.info(f"trained {args.preset} for {step} steps, final train loss {ctx.metrics['final_train_loss']:.3f}")

    return build_model


SCHEMES = [
    ("fp16", dict(bits=16, float_dtype="float16")),
    ("bf16", dict(bits=16, float_dtype="bfloat16")),
    ("int8 weight-only", dict(bits=8, scheme="weight-only")),
    ("int8 dynamic", dict(bits=8, scheme="dynamic")),
    ("int8 static", dict(bits=8, scheme="static")),
    ("int4 g32", dict(bits=4, group_size=32)),
    ("int4 g64", dict(bits=4, group_size=64)),
    ("int4 g128", dict(bits=4, group_size=128)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, 20 s of training, 4 eval batches")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--train-seconds", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default=None, help="training device (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for evaluation and decode timing (0: torch default)")
    ap.add_argument("--eval-batches", type=int, default=None)
    ap.add_argument("--bench-tokens", type=int, default=64)
    ap.add_argument("--home", default=None, help="DSK_HOME to use (default: a fresh temp dir)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    args.preset = args.preset or ("tiny" if args.quick else "small")
    args.train_seconds = args.train_seconds if args.train_seconds is not None else (20 if args.quick else 180)
    eval_batches = args.eval_batches or (4 if args.quick else 32)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DSK_HOME"] = args.home or tempfile.mkdtemp(prefix="dsk-bench-quantize-")

    import dsk.export as export
    import dsk.featurize as featurize
    import dsk.quantize as quantize
    from dsk.artifacts import Store
    from dsk.config import StageParams
    from dsk.runtime import run_stage

    store = Store.open()
    t0 = time.perf_counter()
    text = run_stage(stage="clean", params=StageParams(), inputs=[], build=build_text, store=store).artifact
    tokens = featurize.run(source=text.id, params=featurize.Params(vocab_size=1024), store=store).artifact

    class TrainParams(StageParams):
        preset: str
        train_seconds: float
        max_steps: int
        batch_size: int
        lr: float

    model = run_stage(stage="pretrain", inputs=[tokens], build=make_train_build(args), store=store,
                      params=TrainParams(preset=args.preset, train_seconds=args.train_seconds, max_steps=args.max_steps,
                                         batch_size=args.batch_size, lr=args.lr)).artifact
    print(f"model {model.id}: {model.metrics} ({time.perf_counter() - t0:.0f}s)", flush=True)

    rows = []
    common = dict(eval_batches=eval_batches, eval_batch_size=8, bench_tokens=args.bench_tokens, threads=args.threads)
    from dsk.errors import DskError

    skipped = []
    for name, kw in SCHEMES:
        t = time.perf_counter()
        try:
            m = quantize.run(source=model.id, params=quantize.Params(**kw, **common), store=store).artifact.metrics
        except DskError as exc:  # e.g. a group size that does not divide this preset's widths
            skipped.append({"scheme": name, "reason": str(exc)})
            print(f"{name}: skipped: {exc}", flush=True)
            continue
        rows.append({**m, "name": name, "backend": "torch"})
        print(f"{name}: {time.perf_counter() - t:.0f}s ratio {m['size_ratio_fp32']:.3f} "
              f"ppl {m['parent_perplexity']:.3f}->{m['perplexity']:.3f} ({m['perplexity_change_pct']:+.2f}%) "
              f"{m.get('decode_tokens_per_s', 0):.1f} tok/s (fp32 {m.get('parent_decode_tokens_per_s', 0):.1f})", flush=True)
    t = time.perf_counter()
    exp = export.run(source=model.id, params=export.Params(format="onnx", bench_tokens=args.bench_tokens,
                                                            threads=args.threads), store=store).artifact.metrics
    print(f"onnx export: {time.perf_counter() - t:.0f}s {exp}", flush=True)
    for scheme in ("dynamic", "static"):
        t = time.perf_counter()
        m = quantize.run(source=model.id, params=quantize.Params(bits=8, scheme=scheme, backend="onnx", **common),
                         store=store).artifact.metrics
        rows.append({**m, "name": f"ORT int8 {scheme}"})
        print(f"ORT int8 {scheme}: {time.perf_counter() - t:.0f}s {m}", flush=True)

    result = {
        "benchmark": "quantize",
        "model": {"id": model.id, "preset": args.preset, **model.metrics},
        "tokens": {"id": tokens.id, **{k: tokens.metrics.get(k) for k in ("vocab_size", "n_val_tokens", "val_bytes")}},
        "eval_batches": eval_batches,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "onnx_export": exp,
        "rows": rows,
        "skipped": skipped,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "quantize.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    mdl = r["model"]
    lines = [
        f"# quantize: `{mdl['preset']}` preset ({mdl.get('params', 0) / 1e6:.1f} M params, {mdl.get('steps')} steps "
        f"on {mdl.get('device')}, final train loss {f(mdl.get('final_train_loss'), '.3f')}), "
        f"{r['eval_batches']} val batches x 8 x 256 tokens, {r['threads']} CPU threads ({r['machine']['cpus']} cores)",
        "",
        "| scheme | backend | size MB | x fp32 | val ppl | Δ ppl | bpb | Δ bpb | decode tok/s | fp32 torch tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    parent = r["rows"][0]
    lines.append(
        f"| fp32 (parent) | torch | {parent['fp32_bytes'] / 1e6:.2f} | 1.000 | {parent['parent_perplexity']:.3f} | - | "
        f"{f(parent['parent_bpb'], '.4f')} | - | {f(parent.get('parent_decode_tokens_per_s'), '.1f')} | - |"
    )
    for row in r["rows"]:
        fp32_tok = row.get("parent_decode_tokens_per_s", row.get("torch_fp32_decode_tokens_per_s"))
        lines.append(
            f"| {row['name']} | {row['backend']} | {row['size_bytes'] / 1e6:.2f} | {row['size_ratio_fp32']:.3f} | "
            f"{row['perplexity']:.3f} | {row['perplexity_change_pct']:+.2f}% | {f(row['bpb'], '.4f')} | "
            f"{f(row['bpb_change'], '+.4f')} | {f(row.get('decode_tokens_per_s'), '.1f')} | {f(fp32_tok, '.1f')} |"
        )
    e = r["onnx_export"]
    lines += [
        "",
        f"ONNX export: max |logit diff| vs torch {e['max_abs_logit_diff']:.1e} (cached steps "
        f"{e['max_abs_logit_diff_cached']:.1e}), {e['greedy_tokens']} greedy tokens identical: {e['greedy_tokens_identical']}.",
        "",
        "| decode, batch 1 | tokens/s | x torch fp32 |",
        "| --- | ---: | ---: |",
    ]
    for row in r["rows"]:
        if row["backend"] == "onnx":
            base = row["torch_fp32_decode_tokens_per_s"]
            lines.append(f"| torch fp32 eager (run of {row['name']}) | {base:.1f} | 1.00 |")
            lines.append(f"| ORT fp32 | {row['ort_fp32_decode_tokens_per_s']:.1f} | {row['ort_fp32_decode_tokens_per_s'] / base:.2f} |")
            lines.append(f"| {row['name']} | {row['ort_int8_decode_tokens_per_s']:.1f} | {row['ort_int8_decode_tokens_per_s'] / base:.2f} |")
    for sk in r.get("skipped", []):
        lines.append(f"\n{sk['scheme']}: not applicable: {sk['reason']}")
    lines += ["", "Sizes of the ORT rows are relative to the fp32 ONNX graph; the others to fp32 safetensors."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
