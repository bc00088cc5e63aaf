"""The GPU serving regime on a CPU: the real HTTP server and engine over a simulated device.

On a GPU a decode step of the `small` preset is one CUDA-graph replay that costs about the
same at batch 1 and 16 (H100: ~0.95 ms and ~1.28 ms), so the server's own per-token host work
(detokenising, events, one SSE chunk per token, all under one GIL) decides how much of the
batching gain reaches the clients. This benchmark reproduces that on any machine: the engine
runs over :class:`SimulatedDevice`, whose steps take a fixed time like a device stream (the host
waits without holding the GIL, and can launch the next step before reading the last one's tokens,
as the CUDA-graph runner can), and generates real text (the sample corpus's token ids). The HTTP
server is the real `dsk.serving.app` under uvicorn in its own process; the load generator is
`serve_load.py`'s. Phases alternate between the batched server and a `--max-batch-size 1` one
of the same variant, so each ratio is measured at one time on a shared machine.

    $ python benchmarks/serve_proxy.py                              # defaults: H100-like steps
    $ python benchmarks/serve_proxy.py --variants overlap,sync --clients 1,16 --duration 6
    $ python benchmarks/serve_proxy.py --variants overlap,engine-process --clients 1,16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

SAMPLE = HERE.parent / "data" / "sample" / "tinyshakespeare.txt"

# name -> server flags
VARIANTS = {
    "overlap": [],
    "sync": ["--no-overlap"],
    "overlap-h11": ["--http", "h11", "--loop", "asyncio"],
    "overlap-si": ["--switch-interval", "0.0005"],
    "overlap-prof": ["--profile", "/tmp/serve_proxy_profile.txt"],
    "engine-process": ["--engine-process"],
    "engine-process-thread": ["--engine-process", "--engine-reader", "thread"],
    "engine-process-prof": ["--engine-process", "--profile", "/tmp/serve_proxy_profile.txt"],
}


class _Ready:
    def __init__(self, ready_at: float, tokens: list[int]):
        self.ready_at, self.tokens = ready_at, tokens

    def result(self) -> list[int]:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # like waiting on a CUDA event: the GIL is free meanwhile
        return self.tokens


class SimulatedDevice:
    """An engine backend whose steps take ``step_ms + row_ms * (rows - 1)`` on a simulated stream.

    Steps queue one after the other like kernels on a CUDA stream; a launch costs the host
    ``launch_us`` (Python work holding the GIL, like pinned copies and a graph replay). Each row
    reads the sample text's token ids from its own offset, so the output is real text.
    """

    def __init__(self, corpus: list[int], vocab_size: int, max_len: int, max_batch_size: int, *,
                 step_ms: float, row_ms: float, prefill_ms: float, launch_us: float, overlaps: bool):
        self.corpus, self.vocab_size, self.max_len = corpus, vocab_size, max_len
        self.device = "cpu"
        self.step_s, self.row_s, self.prefill_s = step_ms / 1e3, row_ms / 1e3, prefill_ms / 1e3
        self.launch_s = launch_us / 1e6
        self.overlaps = overlaps
        self.cursor = [0] * (max_batch_size + 1)
        self.busy_until = 0.0
        self._next = 0

    def _run(self, seconds: float, rows: list[int]) -> _Ready:
        end = time.perf_counter() + self.launch_s
        while time.perf_counter() < end:
            pass
        start = max(time.perf_counter(), self.busy_until)
        self.busy_until = start + seconds
        tokens = []
        for r in rows:
            tokens.append(self.corpus[self.cursor[r] % len(self.corpus)])
            self.cursor[r] += 1
        return _Ready(self.busy_until, tokens)

    def set_row(self, row: int, sampler: Any) -> None:
        self._next = (self._next + 7919) % len(self.corpus)
        self.cursor[row] = self._next

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cursor[dst] = self.cursor[src]

    def launch_prefill(self, first_row: int, prompts: list[list[int]]) -> _Ready:
        return self._run(self.prefill_s, list(range(first_row, first_row + len(prompts))))

    def launch_decode(self, positions: list[int]) -> _Ready:
        n = len(positions)
        bucket = 1 << (n - 1).bit_length()
        return self._run(self.step_s + self.row_s * (bucket - 1), list(range(n)))

    def prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]:
        return self.launch_prefill(first_row, prompts).result()

    def decode(self, tokens: list[int], positions: list[int]) -> list[int]:
        return self.launch_decode(positions).result()


def make_codec(vocab_size: int) -> Any:
    from dsk.data.tokenizer import Tokenizer, train_bpe
    from dsk.serving.text import TextCodec

    text = SAMPLE.read_text(encoding="utf-8")
    return TextCodec(Tokenizer(train_bpe(text.split("\n\n"), vocab_size=vocab_size))), text


def make_engine(*, vocab_size: int, max_batch_size: int, step_ms: float, row_ms: float, prefill_ms: float,
                launch_us: float, overlaps: bool, codec: Any = None) -> Any:
    """The engine over a SimulatedDevice (also the factory of the `--engine-process` child)."""
    from dsk.serving.engine import Engine

    if codec is None:
        codec, text = make_codec(vocab_size)
    else:
        text = SAMPLE.read_text(encoding="utf-8")
    corpus = [i for i in codec.encode(text[:200_000]) if i not in codec.stop_ids]
    backend = SimulatedDevice(corpus, codec.vocab_size, 512, max_batch_size, step_ms=step_ms,
                              row_ms=row_ms, prefill_ms=prefill_ms, launch_us=launch_us, overlaps=overlaps)
    return Engine(backend, codec, max_batch_size=max_batch_size, max_queue=10000)


def serve(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    from dsk.serving.app import ServerConfig, create_app
    from dsk.serving.server import bind_socket

    codec, _ = make_codec(args.vocab_size)
    device = dict(vocab_size=args.vocab_size, max_batch_size=args.max_batch_size, step_ms=args.step_ms,
                  row_ms=args.row_ms, prefill_ms=args.prefill_ms, launch_us=args.launch_us,
                  overlaps=not args.no_overlap)
    if args.engine_process:
        from dsk.serving.engine_process import EngineProcess

        engine = EngineProcess("serve_proxy:make_engine", device, max_queue=10000, threads=1, sys_path=[str(HERE)],
                               reader=args.engine_reader)
    else:
        engine = make_engine(**device, codec=codec)
    app = create_app(engine, codec, ServerConfig(model_name="proxy", request_timeout_s=3600))
    import uvicorn

    if args.profile:
        _start_sampler(f"{args.profile}.{args.max_batch_size}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=args.http, loop=args.loop)
    uvicorn.Server(config).run(sockets=[bind_socket("127.0.0.1", args.port)])


def _start_sampler(path: str, every_s: float = 0.0005) -> None:
    """A poor man's py-spy: every ``every_s``, count each thread's innermost frames (as
    "thread: function (file:line)") and, every few seconds, write the top counts to ``path``."""
    import collections
    import threading

    counts: collections.Counter = collections.Counter()

    def run() -> None:
        me = threading.get_ident()
        last = time.monotonic()
        while True:
            time.sleep(every_s)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                f = frame
                while f is not None and len(stack) < 4:
                    stack.append(f"{f.f_code.co_name}({Path(f.f_code.co_filename).name}:{f.f_lineno})")
                    f = f.f_back
                counts[names.get(ident, "?") + ": " + " < ".join(stack)] += 1
            if time.monotonic() - last > 3:
                last = time.monotonic()
                total = sum(counts.values())
                Path(path).write_text("\n".join(f"{c / total:6.1%}  {k}" for k, c in counts.most_common(60)))

    threading.Thread(target=run, daemon=True, name="sampler").start()


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of a process, and of its children (an `--engine-process` server's engine)."""
    own = children = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if int(d.name) == pid:
            own += cpu
        elif int(fields[1]) == pid:
            children += cpu
    return own, children


class ProxyServer:
    def __init__(self, name: str, flags: list[str], max_batch_size: int, common: list[str]):
        from serve_load import free_port

        self.name, self.max_batch_size = name, max_batch_size
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_id = "proxy"
        cmd = [sys.executable, __file__, "serve", "--port", str(self.port), "--max-batch-size",
               str(max_batch_size), *common, *flags]
        self.proc = subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)

    def warm_up(self) -> None:
        import httpx

        from serve_load import wait_up

        wait_up(self.proc, self.url)
        for _ in range(2):
            httpx.post(self.url + "/v1/chat/completions", timeout=60, json={
                "model": "proxy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).raise_for_status()

    def stop(self) -> None:
        from serve_load import stop_server

        stop_server(self.proc, timeout_s=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    sv = sub.add_parser("serve", help="(internal) one server over the simulated device")
    sv.add_argument("--port", type=int, required=True)
    sv.add_argument("--max-batch-size", type=int, default=64)
    sv.add_argument("--no-overlap", action="store_true")
    sv.add_argument("--engine-process", action="store_true", help="the engine core in its own process")
    sv.add_argument("--engine-reader", default="loop", choices=["loop", "thread"],
                    help="where the API process reads the engine's messages")
    sv.add_argument("--http", default="auto")
    sv.add_argument("--loop", default="auto")
    sv.add_argument("--switch-interval", type=float, default=0.0)
    sv.add_argument("--profile", default=None, help="sample every thread's Python stack into this file")
    for p in (ap, sv):
        p.add_argument("--step-ms", type=float, default=0.95, help="a batch-1 decode step (H100 small: ~0.95)")
        p.add_argument("--row-ms", type=float, default=0.022, help="extra per row of the step's bucket "
                                                                      "(H100 small: 1.28 ms at 16 rows)")
        p.add_argument("--prefill-ms", type=float, default=1.0)
        p.add_argument("--launch-us", type=float, default=40.0, help="host time of one launch (GIL held)")
        p.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--variants", default="overlap,sync", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternating phases")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args)
        return 0
    from serve_load import run_phase, wait_idle

    common = ["--step-ms", str(args.step_ms), "--row-ms", str(args.row_ms), "--prefill-ms", str(args.prefill_ms),
              "--launch-us", str(args.launch_us), "--vocab-size", str(args.vocab_size)]
    clients = [int(c) for c in args.clients.split(",")]
    servers = []
    for name in args.variants.split(","):
        for mbs in (64, 1):
            servers.append(ProxyServer(name, VARIANTS[name], mbs, common))
    rows = []
    try:
        for s in servers:
            s.warm_up()
        for rnd in range(args.rounds):
            for n in clients:
                for s in servers:
                    wait_idle(s.url)
                    own, kids = _cpu_seconds(s.proc.pid)
                    r = run_phase(s.url, "proxy", n, args.duration, args.max_tokens, args.client_procs)
                    own2, kids2 = _cpu_seconds(s.proc.pid)
                    tokens = max(r["tokens_per_s"] * r["seconds"], 1)
                    r.update(variant=s.name, max_batch_size=s.max_batch_size, round=rnd,
                             server_cpu_us_per_token=round((own2 + kids2 - own - kids) / tokens * 1e6, 1),
                             engine_process_cpu_us_per_token=round((kids2 - kids) / tokens * 1e6, 1),
                             api_cpu_share=round((own2 - own) / r["seconds"], 2),
                             engine_cpu_share=round((kids2 - kids) / r["seconds"], 2))
                    rows.append(r)
                    print(f"{s.name:<12} batch≤{s.max_batch_size:<3} clients={n:<3} {r['tokens_per_s']:>8.1f} tok/s "
                          f"step {r['step_ms']}ms fwd {r['forward_ms']}ms {r['tokens_per_step']} tok/step queue wait {r['queue_wait_ms']}ms "
                          f"errors {r['errors']} client cpu {r['client_cpu_max']:.0%} "
                          f"server {r['server_cpu_us_per_token']} CPU-us/token (engine process {r['engine_process_cpu_us_per_token']}), "
                          f"CPU: API {r['api_cpu_share']:.0%} engine {r['engine_cpu_share']:.0%}", flush=True)
    finally:
        for s in servers:
            s.stop()
    print("\nvariant       clients  batched tok/s  batch-1 tok/s  ratio")
    for name in args.variants.split(","):
        for n in clients:
            b = [r["tokens_per_s"] for r in rows if r["variant"] == name and r["clients"] == n and r["max_batch_size"] > 1]
            one = [r["tokens_per_s"] for r in rows if r["variant"] == name and r["clients"] == n and r["max_batch_size"] == 1]
            bm, om = sorted(b)[len(b) // 2], sorted(one)[len(one) // 2]
            print(f"{name:<13} {n:>7}  {bm:>13.0f}  {om:>13.0f}  {bm / om:5.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
