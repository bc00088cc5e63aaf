"""The engine in its own process (`dsk serve --engine-process`), as in vLLM's V1 engine core.

In one process the HTTP event loop and the engine thread share one GIL: at 16 streaming clients
the loop's per-chunk work (~50 µs) stretches every engine step, and rows freed by finished
requests wait for the next step. Here the engine core (scheduler, model steps, sampling, and the
per-token text work that decides when a row ends: detokenising, stop strings, the streamed
content filter) runs in a child process with its own GIL; the API process keeps HTTP,
validation, auth, the prompt filter, audit, prompt tokenisation, SSE, jobs and metrics.

:class:`EngineProcess` is the API side: it has the :class:`~dsk.serving.engine.Engine`
interface the app uses (``submit`` → a handle with ``cancel()``, the counters /metrics reads),
so ``create_app`` takes it unchanged. The two sides talk over a private socket pair with
length-prefixed JSON messages (`multiprocessing.connection.Connection.send_bytes`; nothing is
pickled): the API sends ``submit`` / ``cancel`` / ``stop``; the engine sends one ``step``
message per scheduler step with every row's new events (text deltas, finishes, ends), the
requests it admitted and its counters. Admission control (the 429 of ``--max-queue``) is done
in the API process from those messages, so ``submit`` never waits for the other process.

The child exits when told to stop, and also when its end of the socket reaches EOF (the API
process died, even by SIGKILL): no orphans. If the child dies, every open request ends with a
503 error, later requests get 503, and ``/health`` answers 503.

    $ dsk serve --engine-process --port 8000
    >>> engine = EngineProcess("dsk.serving.engine_process:engine_from_artifact",
    ...                        {"artifact_dir": "model/", "max_batch_size": 16})
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Literal

from dsk.errors import DskError
from dsk.serving.engine import (Event, EngineUnavailable, QueueFull, check_request, check_vocab, queue_full,
                                retry_after_s)
from dsk.serving.filter import ContentFilter
from dsk.serving.sampling import SamplingParams

log = logging.getLogger("dsk.serving")

# every field of SamplingParams crosses (derived, so a new field cannot be silently dropped)
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
# the counters a step message carries, in order
_STATS = ("steps", "prompt_tokens_total", "generated_tokens_total", "busy_seconds", "forward_seconds",
          "admitted_total", "queue_wait_seconds")


def _dumps(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    """A request's sampling settings as a JSON object (what :func:`params_from_json` reads back)."""
    return {name: getattr(params, name) for name in _PARAM_FIELDS}  # json writes the stop tuple as a list


def params_from_json(raw: dict[str, Any]) -> SamplingParams:
    fields = {name: raw[name] for name in _PARAM_FIELDS if name in raw}
    fields["stop"] = tuple(str(s) for s in fields.get("stop", ()))
    return SamplingParams(**fields)


def engine_from_artifact(artifact_dir: str, *, blocklist_lines: list[str] | None = None, **kwargs: Any) -> Any:
    """The engine core's factory for a model artifact (`load_engine`'s options)."""
    from dsk.serving.loader import load_engine

    content_filter = ContentFilter.from_lines(blocklist_lines) if blocklist_lines is not None else None
    engine, _codec = load_engine(artifact_dir, content_filter=content_filter, **kwargs)
    return engine


# --------------------------------------------------------------------------- the API side


class _RemoteRequest:
    """The API process's handle of one request (what ``Engine.submit`` returns in-process)."""

    __slots__ = ("id", "n", "on_event", "created", "first_token_at", "state", "open", "owner", "choices")

    def __init__(self, rid: int, n: int, on_event: Callable[[Event], None], owner: "EngineProcess"):
        self.id, self.n, self.on_event, self.owner = rid, n, on_event, owner
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.state = "waiting"  # waiting | running | done
        self.open = 0
        self.choices: list[Any] = []  # `collect` reads the exact ids from here in-process; none here

    def cancel(self) -> None:
        """Free the row at the engine's next step (called on client disconnect, timeouts)."""
        if self.state != "done":
            try:
                self.owner._send({"op": "cancel", "id": self.id})
            except EngineUnavailable:
                pass  # the engine is gone: the request has been (or is being) failed


class EngineProcess:
    """An engine core in a child process, behind the interface ``create_app`` uses.

    ``factory`` ("module:function") builds the engine in the child from ``kwargs`` (JSON);
    ``sys_path`` is put in front of the child's ``sys.path`` (where ``module`` lives). The child
    is started and has loaded its model when the constructor returns; a start-up failure (a bad
    artifact) raises DskError with the child's message.
    """

    def __init__(self, factory: str, kwargs: dict[str, Any], *, max_queue: int = 128,
                 content_filter: ContentFilter | None = None, threads: int = 0,
                 sys_path: list[str] | tuple[str, ...] = (), start_timeout_s: float = 600.0,
                 reader: Literal["loop", "thread"] = "loop"):
        self.max_queue = max_queue
        self.reader = reader  # "loop": on the running event loop where there is one; "thread": always a thread
        self.content_filter = content_filter
        if content_filter is not None:
            if content_filter.lines is None:
                raise DskError("an engine process needs a content filter built from lines (ContentFilter.from_lines)")
            kwargs = {**kwargs, "blocklist_lines": content_filter.lines}
        ours, theirs = socket.socketpair()
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the dsk package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dsk.serving.engine_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.pid = self._proc.pid
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the request table and its counters
        self._requests: dict[int, _RemoteRequest] = {}
        self._next_id = 0
        self._waiting = 0
        self._running = 0
        self._latency_ema = 1.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._gone_once = False
        self._started = False
        self._closed = threading.Event()  # set once the child's end is closed and its requests failed
        self._stopping = False
        self.failure: str | None = None  # why the engine is gone (None while it serves)
        self.steps = self.prompt_tokens_total = self.generated_tokens_total = 0
        self.busy_seconds = self.forward_seconds = 0.0
        self.admitted_total, self.queue_wait_seconds = 0, 0.0
        self._cuda: list[int] | None = None
        self.process_rss_bytes: int | None = None  # the engine process's resident memory, last report
        atexit.register(self._kill)
        try:
            msg = self._handshake({"op": "start", "factory": factory, "kwargs": kwargs, "sys_path": list(sys_path),
                                   "threads": threads}, start_timeout_s)
        except BaseException:  # a start-up error (or Ctrl-C during it) leaves no process and no socket behind
            self._kill()
            self._close()
            atexit.unregister(self._kill)
            raise
        self.max_len = int(msg["max_len"])
        self.vocab_size = int(msg["vocab_size"])
        self.max_batch_size = int(msg["max_batch_size"])
        self.device = str(msg["device"])  # a name: torch.cuda must not start in the API process

    def _handshake(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send the child its engine's spec; its "ready" message, or DskError with why not."""
        try:
            self._send(spec)
        except EngineUnavailable:
            pass  # the child is gone already: below says how it exited
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if self._proc.poll() is not None:
                raise DskError(f"the engine process exited during start-up (exit code {self._proc.returncode})")
            if time.monotonic() > deadline:
                raise DskError(f"the engine process did not start within {timeout_s:g}s")
        try:
            msg = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise DskError(f"the engine process exited during start-up (exit code {self._proc.wait(timeout=30)})") from None
        if msg["op"] == "failed":
            self._proc.wait(timeout=30)
            raise DskError(msg["message"])
        return msg

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EngineProcess":
        """Start reading the engine's messages: on the running event loop when there is one
        (the app's lifespan), so a step's events reach their streams without a thread handing
        them over (and waiting for the loop's GIL); otherwise on a thread of its own."""
        if self._started:
            return self
        self._started = True
        try:
            loop = asyncio.get_running_loop() if self.reader == "loop" else None
        except RuntimeError:
            loop = None
        if loop is not None:
            self._loop, self._loop_thread = loop, threading.get_ident()
            loop.add_reader(self._conn.fileno(), self._on_readable)
        else:
            threading.Thread(target=self._read, name="dsk-engine-reader", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop the child (its open requests end with 503) and wait for it to exit.

        Best called off the event loop (the app's lifespan runs it in a worker thread), so the
        loop can read the child's last messages meanwhile; on the loop, what is still open is
        failed with the same 503 without them."""
        self._stopping = True
        try:
            self._send({"op": "stop"})
        except EngineUnavailable:
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop within 30s; killing it")
            self._kill()
        atexit.unregister(self._kill)  # (the registry would keep this object alive)
        if not self._started:
            self._close()
        elif self._loop is not None and threading.get_ident() == self._loop_thread and not self._closed.is_set():
            # called on the loop itself, which cannot read the child's last messages meanwhile
            self._loop.remove_reader(self._conn.fileno())
            self._gone()
        else:
            self._closed.wait(timeout=10)

    def _close(self) -> None:
        # not while another thread is inside send_bytes: it would write to a None handle, or to
        # whatever file reuses the closed descriptor's number meanwhile
        with self._send_lock:
            self._conn.close()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    # ------------------------------------------------------------------ stats (what /metrics and /health read)
    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def retry_after(self) -> int:
        return retry_after_s(self._waiting, self._running, self.max_batch_size, self._latency_ema)

    def cuda_memory(self) -> tuple[int, int] | None:
        """(allocated, peak allocated) bytes in the engine process, when it runs on CUDA."""
        return tuple(self._cuda) if self._cuda else None  # type: ignore[return-value]

    # ------------------------------------------------------------------ requests
    def check_lengths(self, n_prompt: int, max_tokens: int) -> None:
        check_request(n_prompt, max_tokens, 1, max_len=self.max_len, max_batch_size=self.max_batch_size)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None], *,
               n: int = 1, timeout_s: float | None = None) -> _RemoteRequest:
        """Queue a request in the engine process; raises ValueError, QueueFull or EngineUnavailable."""
        check_request(len(prompt_ids), params.max_tokens, n, max_len=self.max_len, max_batch_size=self.max_batch_size)
        check_vocab(prompt_ids, self.vocab_size)
        if self.failure is not None or not self._started:
            raise EngineUnavailable(self.failure or "the engine is not running")
        with self._lock:
            # the engine's own rule, on the counters its step messages keep current
            if queue_full(self._waiting, self._running, max_queue=self.max_queue, max_batch_size=self.max_batch_size):
                raise QueueFull(self.retry_after())
            self._next_id += 1
            req = _RemoteRequest(self._next_id, n, on_event, self)
            self._requests[req.id] = req
            self._waiting += 1
        try:
            self._send({"op": "submit", "id": req.id, "prompt": [int(i) for i in prompt_ids],
                        "params": params_to_json(params), "n": n, "timeout_s": timeout_s, "created": req.created})
        except EngineUnavailable:
            self._retire(req)
            raise
        return req

    def _send(self, msg: dict[str, Any]) -> None:
        data = _dumps(msg)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError):  # closed or broken: the child is gone
            raise EngineUnavailable(self.failure or "the engine process is not running") from None

    def _retire(self, req: _RemoteRequest) -> None:
        with self._lock:
            if req.state == "waiting":
                self._waiting -= 1
            elif req.state == "running":
                self._running -= req.open
            req.state = "done"
            self._requests.pop(req.id, None)

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        try:
            while True:
                self._handle(json.loads(self._conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        except Exception:  # a bug here must not leave requests hanging: fail them below
            log.exception("reading the engine process's messages failed")
        self._gone()

    def _on_readable(self) -> None:
        """The event loop's reader: every message already waiting, then back to the loop."""
        try:
            while self._conn.poll():
                self._handle(json.loads(self._conn.recv_bytes()))
            return
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading the engine process's messages failed")
        self._loop.remove_reader(self._conn.fileno())
        # waiting for the child's exit code must not block the loop
        threading.Thread(target=self._gone, name="dsk-engine-gone", daemon=True).start()

    def _gone(self) -> None:
        """The child closed its end (it stopped, or died): fail what is still open, with 503."""
        with self._lock:
            if self._gone_once:
                return
            self._gone_once = True
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._proc.returncode
        if self._stopping:
            self.failure = "the server is shutting down"
        else:
            self.failure = f"the engine process exited unexpectedly (exit code {code}); restart the server"
            log.error(self.failure)
        self._close()
        with self._lock:
            left = list(self._requests.values())
        for req in left:
            self._retire(req)
            self._deliver(req, Event("error", text=self.failure, code=503))
        self._closed.set()

    def _deliver(self, req: _RemoteRequest, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # a consumer's problem must not stop the reader
            log.exception("event callback failed")

    def _handle(self, msg: dict[str, Any]) -> None:
        requests = self._requests
        if msg.get("admitted"):
            with self._lock:
                for rid in msg["admitted"]:
                    req = requests.get(rid)
                    if req is not None and req.state == "waiting":
                        req.state, req.open = "running", req.n
                        self._waiting -= 1
                        self._running += req.n
        for rid, kind, choice, text, finish, usage, code in msg.get("events", ()):
            req = requests.get(rid)
            if req is None:
                continue
            if kind == "delta":
                if req.first_token_at is None:
                    req.first_token_at = time.monotonic()
            elif kind == "finish":
                with self._lock:
                    if req.state == "running":
                        req.open -= 1
                        self._running -= 1
            elif kind in ("done", "error"):
                if kind == "done":
                    self._latency_ema = 0.9 * self._latency_ema + 0.1 * (time.monotonic() - req.created)
                self._retire(req)
            self._deliver(req, Event(kind, choice, text, finish_reason=finish, usage=usage, code=code))
        stats = msg.get("stats")
        if stats:
            (self.steps, self.prompt_tokens_total, self.generated_tokens_total, self.busy_seconds,
             self.forward_seconds, self.admitted_total, self.queue_wait_seconds) = stats
        if "rss" in msg:
            self.process_rss_bytes = msg["rss"]
        if "cuda" in msg:
            self._cuda = msg["cuda"]


# --------------------------------------------------------------------------- the engine side


class _Emit:
    """One request's event callback in the engine process: queues the event for the step message."""

    __slots__ = ("core", "rid")

    def __init__(self, core: "EngineCore", rid: int):
        self.core, self.rid = core, rid

    def __call__(self, ev: Event) -> None:
        with self.core.lock:
            self.core.events.append([self.rid, ev.kind, ev.choice, ev.text, ev.finish_reason, ev.usage, ev.code])


class EngineCore:
    """Runs an :class:`~dsk.serving.engine.Engine` for an API process over ``conn``."""

    def __init__(self, engine: Any, conn: Connection):
        self.engine, self.conn = engine, conn
        engine.max_queue = 1 << 30  # the API process answers 429 itself; what it sends is admitted
        engine.on_admit = self._admitted
        engine.after_step = self.flush
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.events: list[list[Any]] = []
        self.admitted: list[int] = []
        self.requests: dict[int, Any] = {}
        self._prune_at = 4 * engine.max_batch_size + 64
        self._memory_at = 0.0
        self._gone = False

    def _admitted(self, req: Any) -> None:
        with self.lock:
            self.admitted.append(req.on_event.rid)

    def send(self, msg: dict[str, Any]) -> None:
        if self._gone:
            return
        try:
            with self.send_lock:
                self.conn.send_bytes(_dumps(msg))
        except (OSError, ValueError):
            self._gone = True  # the API process is gone; the reader sees EOF and stops the engine

    def flush(self) -> None:
        """One message per step: every row's new events, the admitted requests, the counters.

        Runs as the engine's step hook. If it ever fails (a bug: an event that is not JSON), no
        request would hear of its end again, so the process exits instead: the API process sees
        the end of the socket and answers 503 to every open request, as after a crash."""
        try:
            self._flush()
        except Exception:
            log.exception("could not send a step message; the engine process exits")
            self.die()

    def die(self) -> None:
        os._exit(70)

    def _flush(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            admitted, self.admitted = self.admitted, []
        e = self.engine
        msg: dict[str, Any] = {"op": "step", "events": events, "admitted": admitted,
                               "stats": [getattr(e, name) for name in _STATS]}
        now = time.monotonic()
        if now - self._memory_at > 0.5:  # memory twice a second, not every step
            self._memory_at = now
            msg["rss"] = _rss_bytes()
            memory = e.cuda_memory()
            if memory is not None:
                msg["cuda"] = list(memory)
        self.send(msg)

    def submit(self, msg: dict[str, Any]) -> None:
        rid = int(msg["id"])
        try:
            params = params_from_json(msg["params"])
            req = self.engine.submit([int(i) for i in msg["prompt"]], params, _Emit(self, rid),
                                     n=int(msg.get("n", 1)), timeout_s=msg.get("timeout_s"),
                                     created=_float_or_none(msg.get("created")))
        except Exception as exc:  # the API process checked it already; still answer, never hang it
            code = 400 if isinstance(exc, ValueError) else 503
            _Emit(self, rid)(Event("error", text=str(exc), code=code))
            self.flush()
            return
        if len(self.requests) > self._prune_at:
            # finished requests leave the table in batches: the next sweep waits until it has doubled
            self.requests = {k: r for k, r in self.requests.items() if not r.done}
            self._prune_at = max(2 * len(self.requests), 4 * self.engine.max_batch_size + 64)
        self.requests[rid] = req

    def run(self) -> int:
        e = self.engine
        e.start()
        self.send({"op": "ready", "max_len": e.max_len, "vocab_size": e.vocab_size,
                   "max_batch_size": e.max_batch_size, "device": str(e.device), "pid": os.getpid()})
        try:
            while True:
                try:
                    msg = json.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    break  # the API process is gone (even killed): stop, leave no orphan
                op = msg.get("op")
                if op == "submit":
                    self.submit(msg)
                elif op == "cancel":
                    req = self.requests.get(msg.get("id"))
                    if req is not None:
                        req.cancel()
                elif op == "stop":
                    break
        finally:
            e.stop()  # open requests end with 503 "shutting down", flushed by the last step hook
            self.conn.close()
        return 0


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _float_or_none(value: Any) -> float | None:
    # time.monotonic() is CLOCK_MONOTONIC, one clock for all processes on Linux: the API
    # process's arrival time counts the hop to this process as queue time
    return float(value) if isinstance(value, (int, float)) and value <= time.monotonic() else None


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m dsk.serving.engine_process FD`` (started by :class:`EngineProcess`)."""
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C in a terminal reaches the whole process group: the API process stops this one
    # after finishing its requests, so the engine must not die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="dsk engine process: %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    try:
        spec = json.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return 1
    for p in reversed(spec.get("sys_path") or []):
        sys.path.insert(0, p)
    try:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        module, _, name = spec["factory"].partition(":")
        engine = getattr(importlib.import_module(module), name)(**spec["kwargs"])
    except Exception as exc:
        message = str(exc) if isinstance(exc, DskError) else f"the engine failed to start: {exc.__class__.__name__}: {exc}"
        conn.send_bytes(_dumps({"op": "failed", "message": message}))
        conn.close()
        return 1
    return EngineCore(engine, conn).run()


if __name__ == "__main__":
    sys.exit(main())
