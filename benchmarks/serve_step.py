"""Where a serving decode step's time goes: the torch backend alone, no engine and no HTTP.

For each batch size, fill the batch with prompts, then time decode steps (forward + sampling +
the one read of the new tokens) two ways: the fixed-shape steps (`dsk.serving.graphs`, CUDA
graphs on a GPU) and the model's own forward (`static=False`). Also checks that both give the
same greedy tokens from the same start. On a GPU the fixed-shape step should cost about the
same at every batch size up to 64 (launch-bound), so the batching gain is close to the batch size.

    $ python benchmarks/serve_step.py                        # CPU, small preset
    $ python benchmarks/serve_step.py --device cuda --batch-sizes 1,4,16,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> int:
    import torch

    from dsk.models import ModelConfig, Transformer
    from dsk.serving.engine import TorchBackend
    from dsk.serving.sampling import SamplingParams, SequenceSampler

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, vocab_size=1024)
    rows = []
    backends = {}
    reference = Transformer(cfg)
    for static in (True, False):
        model = Transformer(cfg)
        model.load_state_dict(reference.state_dict())
        model = model.to(args.device).eval()
        started = time.perf_counter()
        backends[static] = TorchBackend(model, max(sizes), args.device, static=static)
        print(f"static={static}: backend ready in {time.perf_counter() - started:.1f}s "
              f"(runner: {backends[static].runner is not None}, "
              f"graphs: {getattr(backends[static].runner, 'graphs', False)})", flush=True)
    prompt = list(range(3, 3 + 20))
    for b in sizes:
        greedy = {}
        for static, backend in backends.items():
            for kind in ("greedy", "sampled"):
                params = SamplingParams(temperature=0.0 if kind == "greedy" else 0.8, top_p=1.0)
                for r in range(b):
                    backend.set_row(r, SequenceSampler(params, prompt, cfg.vocab_size))
                with torch.inference_mode():
                    tokens = backend.prefill(0, [prompt] * b)
                    positions = [len(prompt)] * b
                    trace = [tokens]
                    for _ in range(3):  # warm-up
                        tokens = backend.decode(tokens, positions)
                        positions = [p + 1 for p in positions]
                        trace.append(tokens)
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        tokens = backend.decode(tokens, positions)
                        positions = [p + 1 for p in positions]
                        trace.append(tokens)
                    ms = (time.perf_counter() - started) / args.steps * 1000
                if kind == "greedy":
                    greedy[static] = trace
                rows.append({"batch": b, "static": static, "sampling": kind, "ms_per_step": round(ms, 3),
                             "tokens_per_s": round(b / ms * 1000, 1)})
                print(f"  batch {b:<3} {'fixed-shape' if static else 'model fwd  '} {kind:<8} "
                      f"{ms:7.2f} ms/step  {b / ms * 1000:9.0f} tok/s", flush=True)
        same = sum(x == y for x, y in zip(greedy[True], greedy[False]))
        print(f"  batch {b}: greedy steps identical in {same}/{len(greedy[True])} (TF32 on a GPU may differ)",
              flush=True)
    for static in (True, False):
        base = next(r["ms_per_step"] for r in rows if r["static"] is static and r["batch"] == sizes[0]
                    and r["sampling"] == "sampled")
        gains = ", ".join(f"batch {r['batch']} {sizes[0] and r['batch'] * base / r['ms_per_step']:.1f}×"
                          for r in rows if r["static"] is static and r["sampling"] == "sampled")
        print(f"batching gain ({'fixed-shape' if static else 'model forward'}, sampled): {gains}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "preset": args.preset, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
