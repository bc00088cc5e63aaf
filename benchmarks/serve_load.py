"""Load test of `dsk serve`: continuous batching vs one request at a time, side by side.

For each of 1, 4, 16 and 64 concurrent clients, every client sends streaming chat requests
(max_tokens 64, generating exactly 64 tokens each) in a loop for a fixed time against one
server. Reported per phase: generated tokens/s (counted by the server), time to first token
p50/p95, request latency p50/p95, completed requests, errors, and the server's memory (RSS, or
CUDA memory on a GPU) at the start and the end of the phase. The same phases then run against
a server started with `--max-batch-size 1` (the baseline).

The model is a randomly initialised `--preset` (default `small`) with a BPE tokenizer trained
on the sample text; it is committed as a model artifact in a temporary workspace and served
by the real `dsk serve` command in its own process.

Requests still running when a phase's time is up are dropped by the client (the server frees
their slots at once); their tokens generated inside the window count toward tokens/s, but only
finished requests count toward latency.

    $ python benchmarks/serve_load.py                  # CPU, small preset, ~3 minutes
    $ python benchmarks/serve_load.py --quick          # shorter phases, 1/4/16 clients
    $ python benchmarks/serve_load.py --device cuda --preset base --duration 20
    $ python benchmarks/serve_load.py --quick --compare-server-args=--engine-process   # two modes, one run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"
QUESTIONS = [
    "Tell me about the king.", "What does Romeo say to Juliet?", "Summarise the first act.",
    "Who is the villain here?", "Write a short speech about honour.", "Why is the duke angry?",
    "Describe the storm.", "What happens at the feast?",
]


# --------------------------------------------------------------------------- model + server


def make_model_artifact(home: Path, preset: str, vocab_size: int, context: int | None) -> str:
    """A random-init model artifact (weights, config, tokenizer) committed in workspace ``home``."""
    import torch

    from dsk.artifacts import Store
    from dsk.config import StageParams
    from dsk.data.tokenizer import train_bpe
    from dsk.models import ModelConfig, Transformer, save_model
    from dsk.runtime import run_stage

    paragraphs = SAMPLE.read_text(encoding="utf-8").split("\n\n")
    tok = train_bpe(paragraphs, vocab_size=vocab_size)
    overrides = {"vocab_size": tok.get_vocab_size()}
    if context:
        overrides["max_seq_len"] = context
    cfg = ModelConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)

    def build(ctx):
        save_model(model, ctx.out, tokenizer=tok)
        ctx.kind = "model"
        ctx.metrics["params"] = model.num_params()

    art = run_stage(stage="pretrain", params=StageParams(), inputs=[], build=build, store=Store.open(home)).artifact
    return art.id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, model_id: str, *, max_batch_size: int, device: str, port: int,
                 threads: int, extra: list[str] = ()) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "DSK_HOME": str(home), "PYTHONPATH": path}
    env.pop("DSK_API_KEYS", None)
    cmd = [sys.executable, "-m", "dsk", "serve", model_id, "--port", str(port), "--device", device,
           "--max-batch-size", str(max_batch_size), "--max-queue", "10000", "--request-timeout-s", "3600",
           "--threads", str(threads),
           "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop_server(proc: subprocess.Popen, *, timeout_s: float) -> None:
    """Terminate a server process, killing it if it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_up(proc: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for name in ("dsk_generated_tokens_total", "dsk_engine_steps_total", "dsk_engine_busy_seconds_total",
                 "dsk_engine_forward_seconds_total", "dsk_admitted_requests_total", "dsk_queue_wait_seconds_total",
                 "process_resident_memory_bytes", "dsk_engine_process_resident_memory_bytes", "dsk_running_batch_size",
                 "dsk_queue_depth", "dsk_cuda_memory_allocated_bytes", "dsk_cuda_max_memory_allocated_bytes"):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


# --------------------------------------------------------------------------- load


async def one_client(client, url: str, model: str, max_tokens: int, end: float, k: int, stats: dict) -> None:
    i = k
    while time.monotonic() < end:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        i += 1
        started = time.monotonic()
        first = None
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    stats["errors"] += 1
                    stats["error_kinds"].append(f"HTTP {resp.status_code}")
                    await resp.aread()
                    continue
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    payload = json.loads(data)
                    if "error" in payload:
                        raise RuntimeError(payload["error"]["message"])
                    choices = payload.get("choices") or []
                    if first is None and choices and choices[0].get("delta", {}).get("content"):
                        first = time.monotonic()
                        stats["ttft"].append(first - started)
                    if payload.get("usage"):
                        stats["tokens"].append(payload["usage"]["completion_tokens"])
                if done:
                    stats["latency"].append(time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is an error to report
            stats["errors"] += 1
            stats["error_kinds"].append(f"{exc.__class__.__name__}: {exc}"[:120])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def client_group(url: str, model: str, first: int, count: int, start: float, end: float,
                       max_tokens: int) -> dict:
    """``count`` clients (numbered from ``first``) on one asyncio loop, from wall time ``start`` to ``end``."""
    import httpx

    stats = {"ttft": [], "latency": [], "tokens": [], "errors": 0, "error_kinds": []}
    limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=count + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as client:
        await asyncio.sleep(max(start - time.time(), 0))
        deadline = time.monotonic() + (end - time.time())
        tasks = [asyncio.create_task(one_client(client, url, model, max_tokens, deadline, k, stats))
                 for k in range(first, first + count)]
        await asyncio.sleep(max(deadline - time.monotonic(), 0))
        for t in tasks:  # requests still running are dropped; the server frees their slots
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats


def _client_process(url: str, model: str, first: int, count: int, start: float, end: float, max_tokens: int,
                    out: Any) -> None:
    started_cpu = time.process_time()
    stats = asyncio.run(client_group(url, model, first, count, start, end, max_tokens))
    stats["cpu_s"] = time.process_time() - started_cpu
    out.put(stats)


def run_phase(url: str, model: str, clients: int, duration: float, max_tokens: int, procs: int) -> dict:
    """One phase: ``clients`` clients spread over ``procs`` load-generator processes (so that on a
    fast server the clients' own JSON/SSE parsing is not what limits the rate)."""
    import multiprocessing as mp

    procs = max(1, min(procs, clients))
    before = scrape(url)
    mem = [_rss(before)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + (2.0 if procs > 1 else 0.2)  # spawned processes need a moment to start
    end = start + duration
    workers = []
    for g in range(procs):
        first, count = g * clients // procs, (g + 1) * clients // procs - g * clients // procs
        w = ctx.Process(target=_client_process, args=(url, model, first, count, start, end, max_tokens, out))
        w.start()
        workers.append(w)
    time.sleep(max(start - time.time(), 0))
    before = scrape(url)
    t0 = time.monotonic()
    while time.time() < end:
        time.sleep(min(1.0, max(end - time.time(), 0.01)))
        mem.append(_rss(scrape(url)))
    after = scrape(url)
    elapsed = time.monotonic() - t0
    groups = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    stats = {k: [v for g in groups for v in g[k]] for k in ("ttft", "latency", "tokens", "error_kinds")}
    stats["errors"] = sum(g["errors"] for g in groups)
    generated = after["dsk_generated_tokens_total"] - before["dsk_generated_tokens_total"]
    steps = max(after["dsk_engine_steps_total"] - before["dsk_engine_steps_total"], 1)
    busy = after["dsk_engine_busy_seconds_total"] - before["dsk_engine_busy_seconds_total"]
    forward = after["dsk_engine_forward_seconds_total"] - before["dsk_engine_forward_seconds_total"]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(generated / elapsed, 1),
        "completed": len(stats["latency"]),
        # where the server's time went: a step's mean time, the forward pass's part of it, and
        # the share of wall time the engine thread was stepping at all
        "step_ms": round(busy / steps * 1000, 2), "forward_ms": round(forward / steps * 1000, 2),
        "engine_busy": round(busy / elapsed, 3), "tokens_per_step": round(generated / steps, 2),
        # mean time a request waited from arrival to its batch row (a finished row's next
        # request: the turnaround that leaves rows empty)
        "queue_wait_ms": _queue_wait_ms(before, after),
        "ttft_p50_s": pct(stats["ttft"], 50), "ttft_p95_s": pct(stats["ttft"], 95),
        "latency_p50_s": pct(stats["latency"], 50), "latency_p95_s": pct(stats["latency"], 95),
        "errors": stats["errors"], "error_kinds": sorted(set(stats["error_kinds"]))[:5],
        "rss_start_mb": round(mem[0] / 2**20, 1), "rss_end_mb": round(mem[-1] / 2**20, 1),
        "rss_peak_mb": round(max(mem) / 2**20, 1),
        "cuda_peak_mb": round(after["dsk_cuda_max_memory_allocated_bytes"] / 2**20, 1)
        if "dsk_cuda_max_memory_allocated_bytes" in after else None,
        # the load generator's own CPU use (share of one core per process): near 100% would
        # mean the clients, not the server, set the pace
        "client_procs": procs,
        "client_cpu_max": round(max(g["cpu_s"] for g in groups) / max(elapsed, 1e-9), 2),
    }


def _rss(metrics: dict[str, float]) -> float:
    """The server's resident memory: with `--engine-process`, the API and engine processes together."""
    return metrics.get("process_resident_memory_bytes", 0) + metrics.get("dsk_engine_process_resident_memory_bytes", 0)


def _queue_wait_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    name = "dsk_admitted_requests_total"
    if name not in after:
        return None
    admitted = after[name] - before[name]
    wait = after["dsk_queue_wait_seconds_total"] - before["dsk_queue_wait_seconds_total"]
    return round(wait / admitted * 1000, 2) if admitted else None


def wait_idle(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = scrape(url)
        if m.get("dsk_running_batch_size", 0) == 0 and m.get("dsk_queue_depth", 0) == 0:
            return
        time.sleep(0.1)


class Server:
    """One `dsk serve` process on a free port."""

    def __init__(self, home: Path, model_id: str, *, max_batch_size: int, device: str, threads: int,
                 extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = list(extra)
        self.max_batch_size = max_batch_size
        self.model_id = model_id
        self.proc = start_server(home, model_id, max_batch_size=max_batch_size, device=device, port=self.port,
                                 threads=threads, extra=extra)

    def warm_up(self) -> None:
        import httpx

        wait_up(self.proc, self.url)
        for _ in range(2):  # first calls pay for lazy initialisation
            httpx.post(self.url + "/v1/chat/completions", timeout=600, json={
                "model": self.model_id, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8}).raise_for_status()

    def phase(self, clients: int, duration: float, max_tokens: int, procs: int) -> dict:
        wait_idle(self.url)
        result = run_phase(self.url, self.model_id, clients, duration, max_tokens, procs)
        result["max_batch_size"] = self.max_batch_size
        print(f"  batch≤{self.max_batch_size:<3} clients={clients:<3} {result['tokens_per_s']:>8.1f} tok/s  "
              f"TTFT p50 {fmt(result['ttft_p50_s'])}  latency p50 {fmt(result['latency_p50_s'])}  "
              f"done {result['completed']}  errors {result['errors']}  RSS {result['rss_end_mb']} MB  "
              f"step {result['step_ms']}ms (forward {result['forward_ms']}ms, busy {result['engine_busy']:.0%}, "
              f"{result['tokens_per_step']} tok/step, queue wait {result['queue_wait_ms']}ms; "
              f"clients: {result['client_procs']} procs, "
              f"busiest {result['client_cpu_max']:.0%} CPU)", flush=True)
        return result

    def stop(self) -> None:
        stop_server(self.proc, timeout_s=30)


def engine_only(model_dir: Path, *, batch_sizes: list[int], device: str, threads: int, max_tokens: int,
                rounds: int = 3, static: bool | None = None) -> list[dict]:
    """The engine without HTTP, in this process: B requests at once, B = each batch size in
    turn, alternating for ``rounds`` rounds (best round kept), so that load from other
    processes hits every batch size alike. Tells the batching gain apart from serving overhead."""
    import queue

    import torch

    from dsk.serving.engine import iter_queue
    from dsk.serving.loader import load_engine
    from dsk.serving.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    engine, codec = load_engine(model_dir, device=device, max_batch_size=max(batch_sizes), max_queue=10_000,
                                static=static)
    engine.start()
    ids = codec.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True)
    best: dict[int, float] = {}
    try:
        engine.generate(ids, SamplingParams(max_tokens=8))  # warm-up
        for _ in range(rounds):
            for b in batch_sizes:
                queues = [queue.Queue() for _ in range(b)]
                started = time.perf_counter()
                for q in queues:
                    engine.submit(ids, params, q.put)
                for q in queues:
                    for _ev in iter_queue(q):
                        pass
                rate = b * max_tokens / (time.perf_counter() - started)
                best[b] = max(best.get(b, 0.0), rate)
    finally:
        engine.stop()
    base = best[min(batch_sizes)]
    rows = [{"batch": b, "tokens_per_s": round(best[b], 1), "speedup": round(best[b] / base, 2)} for b in batch_sizes]
    label = {None: "", True: " (static steps)", False: " (model's own forward, no CUDA graphs)"}[static]
    for r in rows:
        print(f"  engine only{label}: batch {r['batch']:<3} {r['tokens_per_s']:>8.1f} tok/s  ({r['speedup']}× batch 1)",
              flush=True)
    return rows


def http_stack() -> str:
    """What uvicorn picks with its defaults (http="auto", loop="auto") in this environment."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http} + {loop}"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


# --------------------------------------------------------------------------- report


def write_report(result: dict) -> None:
    out_dir = Path(result.get("out_dir") or HERE / "results")
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{result['out_name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    batched = {p["clients"]: p for p in result["batched"]}
    base = {p["clients"]: p for p in result["baseline"]}
    lines = [
        f"# serve_load: continuous batching (max batch {result['max_batch_size']}) vs max batch 1",
        "",
        f"preset `{result['preset']}` ({result['params'] / 1e6:.1f}M params, vocab {result['vocab_size']}, "
        f"context {result['context']}), device `{result['device']}`, chat requests of {result['max_tokens']} "
        f"tokens, {result['duration_s']:g} s per phase, server torch threads {result['threads'] or 'default'}"
        f"{', server options ' + repr(result['server_args']) if result.get('server_args') else ''}, "
        f"HTTP {result.get('http_stack', '?')}. {result['machine']}"
        + "".join(f". Phases alternated with a server pair run with {('options ' + repr(a)) if a else 'no extra options'}"
                  " (its own report)" for a in result.get("alternated_with") or []),
        "",
        "| clients | tok/s batched | tok/s batch 1 | speed-up | TTFT p50 / p95 batched | TTFT p50 / p95 batch 1 "
        "| latency p50 / p95 batched | latency p50 / p95 batch 1 | done (b / 1) | errors (b / 1) "
        "| RSS start→end MB (b / 1) |",
        "|---:|---:|---:|---:|---|---|---|---|---|---|---|",
    ]
    for n in sorted(batched):
        b, s = batched[n], base.get(n, {})
        speed = b["tokens_per_s"] / s["tokens_per_s"] if s.get("tokens_per_s") else float("nan")
        lines.append(
            f"| {n} | {b['tokens_per_s']:.0f} | {s.get('tokens_per_s', 0):.0f} | {speed:.1f}× "
            f"| {fmt(b['ttft_p50_s'])} / {fmt(b['ttft_p95_s'])} | {fmt(s.get('ttft_p50_s'))} / {fmt(s.get('ttft_p95_s'))} "
            f"| {fmt(b['latency_p50_s'])} / {fmt(b['latency_p95_s'])} "
            f"| {fmt(s.get('latency_p50_s'))} / {fmt(s.get('latency_p95_s'))} "
            f"| {b['completed']} / {s.get('completed', 0)} | {b['errors']} / {s.get('errors', 0)} "
            f"| {b['rss_start_mb']:.0f}→{b['rss_end_mb']:.0f} / {s.get('rss_start_mb', 0):.0f}→{s.get('rss_end_mb', 0):.0f} |"
        )
    lines += ["", "Where a batched step's time goes (server side): "
              + ", ".join(f"{p['clients']} clients {p['step_ms']:.2f} ms/step ({p['forward_ms']:.2f} ms forward or "
                          f"waiting for the device, {p['tokens_per_step']:.1f} tokens/step, "
                          f"engine busy {p['engine_busy']:.0%}"
                          + (f", queue wait {p['queue_wait_ms']:.1f} ms" if p.get("queue_wait_ms") is not None else "")
                          + ")" for p in result["batched"])]
    if any("client_cpu_max" in p for p in result["batched"]):
        lines += ["", "Load generator (batched phases): "
                  + ", ".join(f"{p['clients']} clients on {p['client_procs']} process(es), busiest at "
                              f"{p['client_cpu_max']:.0%} of a core" for p in result["batched"])]
    if result.get("engine_only"):
        lines += ["", "Engine only (no HTTP, one process, batch sizes alternated, best of 3): "
                  + ", ".join(f"batch {r['batch']} {r['tokens_per_s']:.0f} tok/s ({r['speedup']:.1f}×)"
                              for r in result["engine_only"])]
    if result.get("engine_only_eager"):
        lines += ["", "Engine only, the model's own forward (no fixed-shape steps, no CUDA graphs): "
                  + ", ".join(f"batch {r['batch']} {r['tokens_per_s']:.0f} tok/s ({r['speedup']:.1f}×)"
                              for r in result["engine_only_eager"])]
    if any(p.get("cuda_peak_mb") for p in result["batched"]):
        lines += ["", "CUDA peak memory (MB), batched: "
                  + ", ".join(f"{p['clients']} clients {p['cuda_peak_mb']}" for p in result["batched"])]
    (out_dir / f"{result['out_name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="model preset (tiny, small, base, ...)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=64, help="the batched server's --max-batch-size")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--context", type=int, default=None, help="override the preset's max_seq_len")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch CPU threads (1: on a shared 2-core machine OpenMP spin-waits "
                         "make 2 threads many times slower; 0 = torch's default)")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="load-generator processes (0: 1 on cpu, where cores are scarce; on cuda one per client up to 16, "
                         "which keeps the batch full: docs/serve.md)")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also measure the engine alone with the model's own forward (static steps off)")
    ap.add_argument("--out-dir", default=None, help="where the results go (default: benchmarks/results)")
    ap.add_argument("--out-name", default="serve_load", help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--quick", action="store_true", help="4 s phases, 1/4/16 clients")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--server-args", default="", help="extra `dsk serve` options for both servers, e.g. '--no-overlap'")
    ap.add_argument("--compare-server-args", default=None,
                    help="also run a second pair of servers (batched + batch 1) with these `dsk serve` options, "
                         "phases alternating with the first pair's, written as NAME_compare.{json,md}; e.g. "
                         "'--engine-process'")
    ap.add_argument("--skip-engine-only", action="store_true", help="skip the in-process engine measurement")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.clients = 4.0, "1,4,16"
    clients = [int(c) for c in args.clients.split(",")]

    from dsk.models import ModelConfig

    home = Path(tempfile.mkdtemp(prefix="dsk-serve-bench-"))
    try:
        started = time.monotonic()
        model_id = make_model_artifact(home, args.preset, args.vocab_size, args.context)
        from dsk.artifacts import Store
        art = Store.open(home).resolve(model_id)
        cfg = ModelConfig.from_dict(json.loads((art.path / "config.json").read_text()))
        print(f"model {model_id}: preset {args.preset}, {art.metrics['params'] / 1e6:.1f}M params; "
              f"device {args.device}", flush=True)
        # every server stays up (an idle one costs no CPU) and their phases alternate, so that
        # each pair of numbers compared was measured at nearly the same time on a shared machine;
        # one pair (batched + batch 1) per set of options (the second: --compare-server-args)
        pairs = [(args.out_name, args.server_args)]
        if args.compare_server_args is not None:
            pairs.append((args.out_name + "_compare", " ".join([args.server_args, args.compare_server_args]).strip()))
        servers: list[list[Server]] = []
        for _name, server_args in pairs:
            extra = server_args.split()
            pair = [Server(home, model_id, max_batch_size=args.max_batch_size, device=args.device,
                           threads=args.threads, extra=extra)]
            if not args.skip_baseline:
                pair.append(Server(home, model_id, max_batch_size=1, device=args.device, threads=args.threads,
                                   extra=extra))
            servers.append(pair)
        phases: list[tuple[list[dict], list[dict]]] = [([], []) for _ in pairs]
        try:
            for pair in servers:
                for server in pair:
                    server.warm_up()
            for n in clients:
                procs = args.client_procs or (1 if args.device == "cpu" else min(n, 16))
                for (batched, baseline), pair in zip(phases, servers):
                    if len(pairs) > 1:
                        print(f"  [{' '.join(pair[0].extra) or 'default'}]", flush=True)
                    batched.append(pair[0].phase(n, args.duration, args.max_tokens, procs))
                    if len(pair) > 1:
                        baseline.append(pair[1].phase(n, args.duration, args.max_tokens, procs))
        finally:
            for pair in servers:
                for server in pair:
                    server.stop()
        engine_rows = [] if args.skip_engine_only else engine_only(
            art.path, batch_sizes=sorted({1, *clients}), device=args.device, threads=args.threads,
            max_tokens=args.max_tokens)
        eager_rows = engine_only(
            art.path, batch_sizes=sorted({1, *clients}), device=args.device, threads=args.threads,
            max_tokens=args.max_tokens, static=False) if args.compare_eager else []
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
        if args.device == "cuda":
            import torch

            machine += f", {torch.cuda.get_device_name(0)}"
        ok = True
        for (out_name, server_args), (batched, baseline) in zip(pairs, phases):
            result = {
                "preset": args.preset, "params": art.metrics["params"], "vocab_size": cfg.vocab_size,
                "context": cfg.max_seq_len, "device": args.device, "max_tokens": args.max_tokens,
                "duration_s": args.duration, "max_batch_size": args.max_batch_size, "machine": machine,
                "threads": args.threads, "out_name": out_name, "http_stack": http_stack(), "server_args": server_args,
                "out_dir": args.out_dir, "alternated_with": [a for _, a in pairs if a != server_args],
                "batched": batched, "baseline": baseline, "engine_only": engine_rows, "engine_only_eager": eager_rows,
                "wall_s": round(time.monotonic() - started, 1),
            }
            write_report(result)
            ok = ok and all(p["errors"] == 0 for p in batched + baseline)
        return 0 if ok else 1
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
