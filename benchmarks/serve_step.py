"""Where a serving decode step's time goes: the torch backend alone, no engine and no HTTP.

For each batch size, fill the batch with prompts, then time decode steps (forward + sampling +
the one read of the new tokens) two ways: the fixed-shape steps (`dsk.serving.graphs`, CUDA
graphs on a GPU) and the model's own forward (`static=False`). Also checks that both give the
same greedy tokens from the same start. On a GPU the fixed-shape step should cost about the
same at every batch size up to 64 (launch-bound), so the batching gain is close to the batch size.

    $ python benchmarks/serve_step.py                        # CPU, small preset
    $ python benchmarks/serve_step.py --device cuda --batch-sizes 1,4,16,64
    $ python benchmarks/serve_step.py --device cuda --variants --profile   # + each decode graph's device time

``--variants`` times every captured decode graph (rows bucket × attention span × sampling mode)
by replaying it back to back between CUDA events: device time only, no host work. ``--profile``
lists the CUDA kernels of one eager decode step per batch size (torch.profiler), largest first.
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
    ap.add_argument("--variants", action="store_true", help="time every decode graph variant (CUDA)")
    ap.add_argument("--profile", action="store_true", help="kernel table of one eager decode step per batch size")
    ap.add_argument("--no-tf32", action="store_true", help="full fp32 matmuls on CUDA (the server uses TF32)")
    ap.add_argument("--skip-eager", action="store_true", help="skip the model's own forward")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, vocab_size=1024)
    rows = []
    backends = {}
    reference = Transformer(cfg)
    for static in (True,) if args.skip_eager else (True, False):
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
        if False in greedy:
            same = sum(x == y for x, y in zip(greedy[True], greedy[False]))
            print(f"  batch {b}: greedy steps identical in {same}/{len(greedy[True])} (TF32 on a GPU may differ)",
                  flush=True)
    for static in backends:
        base = next(r["ms_per_step"] for r in rows if r["static"] is static and r["batch"] == sizes[0]
                    and r["sampling"] == "sampled")
        gains = ", ".join(f"batch {r['batch']} {sizes[0] and r['batch'] * base / r['ms_per_step']:.1f}×"
                          for r in rows if r["static"] is static and r["sampling"] == "sampled")
        print(f"batching gain ({'fixed-shape' if static else 'model forward'}, sampled): {gains}")
    runner = backends[True].runner
    variant_rows = time_variants(runner, sizes) if args.variants and runner is not None and runner.graphs else []
    profiles = profile_steps(runner, sizes) if args.profile and args.device == "cuda" and runner is not None else {}
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "preset": args.preset, "rows": rows,
                                              "variants": variant_rows, "profiles": profiles}, indent=2))
    return 0


def time_variants(runner, sizes: list[int], replays: int = 200) -> list[dict]:
    """Device time of each captured decode graph: ``replays`` back-to-back replays between two
    CUDA events (the rows' contents do not matter for the time: fixed shapes)."""
    import torch

    out = []
    for (b, span, mode), graph in sorted(runner._decode_graphs.items()):
        if b not in sizes:
            continue
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / replays
        out.append({"batch": b, "span": span, "mode": mode, "device_ms": round(ms, 4)})
    print("decode graph device time (ms/step), rows × span, per sampling mode:")
    for mode in ("greedy", "plain", "full"):
        print(f"  {mode}:")
        for b in sizes:
            cells = "  ".join(f"{r['span']}: {r['device_ms']:.3f}" for r in out if r["batch"] == b and r["mode"] == mode)
            print(f"    batch {b:<3} {cells}")
    return out


def profile_steps(runner, sizes: list[int], top: int = 25) -> dict:
    """CUDA kernels of one eager decode step (span 128 and the whole context, plain and full
    sampling) per batch size, summed by kernel name over 20 steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for b in sizes:
        for span in sorted({128, runner.max_len}):
            for mode in ("plain", "full"):
                with torch.inference_mode():
                    for _ in range(3):
                        runner._decode_body(b, span, mode)
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(20):
                            runner._decode_body(b, span, mode)
                        torch.cuda.synchronize()
                kernels = {}
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        name = ev.name[:90]
                        t, n = kernels.get(name, (0.0, 0))
                        kernels[name] = (t + ev.time_range.elapsed_us() / 20, n + 1)
                total = sum(t for t, _ in kernels.values())
                count = sum(n for _, n in kernels.values()) / 20
                rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
                # the same time by the aten op that launched it (self device time)
                ops = sorted(((e.key, e.self_device_time_total / 20, e.count / 20) for e in prof.key_averages()
                              if e.self_device_time_total > 0), key=lambda o: -o[1])[:top]
                key = f"batch {b} span {span} {mode}"
                result[key] = {"kernel_us": round(total, 1), "kernels": count,
                               "top": [{"name": k, "us": round(t, 2), "per_step": n / 20} for k, (t, n) in rows],
                               "ops": [{"op": k, "us": round(t, 2), "per_step": n} for k, t, n in ops]}
                print(f"{key}: {count:.0f} kernels, {total:.0f} us of kernel time per step")
                for k, (t, n) in rows[:12]:
                    print(f"    {t:7.1f} us  x{n / 20:<4.0f} {k}")
                for k, t, n in ops[:15]:
                    print(f"    {t:7.1f} us  x{n:<4.0f} op {k}")
    return result


if __name__ == "__main__":
    sys.exit(main())
