"""The inference engine: a continuous-batching scheduler over one preallocated, per-row KV cache.

One background thread runs the loop. At every decode step it

1. drops sequences whose client went away or whose deadline passed,
2. admits waiting requests into free rows of the running batch (up to ``max_batch_size``) and
   prefills all of them in one padded forward pass,
3. runs one batched decode step for every running sequence (each row at its own position),
   samples each row with that request's own settings, and
4. removes finished sequences at once, moving the last row into the hole so the running batch
   always occupies rows ``0..n-1`` of the cache (a contiguous view the model can take).

So a short request admitted next to a long one finishes and leaves without waiting for it.
With a backend that can launch ahead (``overlap``: the CUDA-graph runner, whose rows keep their
next input token on the device), step 3 only launches step k and then handles step k-1's tokens
while the device computes, so the per-token host work (text, stop strings, events) hides behind
the device instead of adding to every step.
The model side is a backend: :class:`TorchBackend` (a dsk Transformer over one preallocated
per-row KV cache: batched prefill and decode) or :class:`OnnxBackend` (an exported ONNX graph in
onnxruntime, one sequence per call). Results go back through a callback per request (called on the engine thread; it must not
block): the HTTP layer forwards them into an asyncio queue, `generate()`/`stream()` into a
plain queue.

    >>> engine = Engine(model, codec, max_batch_size=16).start()
    >>> engine.generate(codec.encode("To be"), SamplingParams(max_tokens=20, seed=1)).choices[0].text
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch

from dsk.errors import DskError
from dsk.serving.filter import ContentFilter
from dsk.serving.graphs import sampling_mode
from dsk.serving.sampling import BatchSampler, SamplingParams, SequenceSampler

log = logging.getLogger("dsk.serving")

# Prefill at most this many (padded) prompt tokens per step, so a burst of long prompts cannot
# stall the running sequences for long; at least one request is always admitted.
DEFAULT_PREFILL_TOKENS = 4096


CANCELLED = "the request was cancelled (the client went away)"


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the client should retry after ``retry_after`` s."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry after {retry_after}s")
        self.retry_after = retry_after


class EngineUnavailable(RuntimeError):
    """The engine is not running (stopped, or its process exited): answered as 503."""


def check_request(n_prompt: int, max_tokens: int, n: int, *, max_len: int, max_batch_size: int) -> None:
    """Raise ValueError with a client-facing message when a request cannot fit the context."""
    if n_prompt < 1:
        raise ValueError("the prompt is empty")
    if n_prompt >= max_len:
        raise ValueError(
            f"the prompt is {n_prompt} tokens; this model's context is {max_len} tokens "
            f"(shorten the prompt)"
        )
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if n_prompt + max_tokens > max_len:
        raise ValueError(
            f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
            f"context of {max_len} tokens; ask for at most {max_len - n_prompt}"
        )
    if not 1 <= n <= max_batch_size:
        raise ValueError(f"n={n} must be between 1 and the server's max batch size {max_batch_size}")


def queue_full(waiting: int, running: int, *, max_queue: int, max_batch_size: int) -> bool:
    """Whether a new request is refused (429): requests that free rows will take at the next
    step are not "queued"."""
    return waiting >= max_queue + max(max_batch_size - running, 0)


def retry_after_s(waiting: int, running: int, max_batch_size: int, latency_s: float) -> int:
    """Seconds a refused client should wait: the queue drained at the recent request rate."""
    return max(1, min(60, round((waiting + running) / max_batch_size * latency_s)))


def check_vocab(prompt_ids: list[int], vocab_size: int) -> None:
    for i in prompt_ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")


class Codec(Protocol):
    """What the engine needs from a tokenizer."""

    stop_ids: frozenset[int]

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class Backend(Protocol):
    """What the engine steps: rows 0..n-1 of a batch, each with its own sampler and position.

    :class:`TorchBackend` and :class:`OnnxBackend` are backends; an :class:`Engine` given anything
    else (a dsk Transformer) wraps it in a TorchBackend. A backend that can launch a step before
    the previous one's tokens are read also has ``overlaps = True``, ``launch_prefill`` and
    ``launch_decode`` (returning handles whose ``result()`` gives the tokens).
    """

    max_len: int
    vocab_size: int
    device: Any

    def set_row(self, row: int, sampler: SequenceSampler) -> None: ...

    def prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]: ...

    def decode(self, tokens: list[int], positions: list[int]) -> list[int]: ...

    def move_row(self, src: int, dst: int, length: int) -> None: ...


@dataclass
class Event:
    """One message from the engine about a request.

    kind: ``delta`` (new text of one choice), ``finish`` (one choice ended, with its reason),
    ``done`` (every choice ended; ``usage`` filled), ``error`` (the request failed: ``text``
    says why, ``code`` is the HTTP status it maps to).
    """

    kind: str
    choice: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    code: int = 500


@dataclass
class Choice:
    """One generated sequence; a request with ``n`` > 1 has several."""

    request: "Request"
    index: int
    sampler: SequenceSampler
    out_ids: list[int] = field(default_factory=list)
    n_generated: int = 0  # includes a stop token that is not part of out_ids
    pos: int = 0  # tokens of this row already in the KV cache
    text: str = ""  # decoded output so far (after stop/filter truncation once finished)
    emitted: int = 0  # characters of text already sent
    finish_reason: str | None = None
    # incremental detokenisation: out_ids[:read] are in ``text``; out_ids[prefix:read] is the
    # window decoded again as context (so the new text is a difference of two short decodes)
    prefix: int = 0
    read: int = 0
    launched: int = 0  # tokens asked of the backend so far (overlapped steps run ahead of n_generated)
    retired: bool = False  # its last token is launched: out of the running batch, result still in flight


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    on_event: Callable[[Event], None]
    deadline: float | None
    id: int = 0
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False
    choices: list[Choice] = field(default_factory=list)
    open_choices: int = 0
    done: bool = False

    def cancel(self) -> None:
        """Called from any thread (e.g. on client disconnect): the slot is freed at the next step."""
        self.cancelled = True


@dataclass
class ChoiceResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class Result:
    choices: list[ChoiceResult]
    usage: dict[str, int]
    error: str | None = None
    code: int = 200
    ttft_s: float | None = None


class Engine:
    def __init__(
        self,
        model: Any,
        codec: Codec,
        *,
        max_batch_size: int = 16,
        max_queue: int = 128,
        content_filter: ContentFilter | None = None,
        prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        device: str | torch.device | None = None,
        static: bool | None = None,
        overlap: bool | None = None,
    ):
        if max_batch_size < 1:
            raise DskError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.backend = (model if isinstance(model, Backend)
                        else TorchBackend(model, max_batch_size, device, static=static))
        # overlapped steps (backends that can launch a step before the last one's tokens are
        # read): the host handles step k-1's tokens while the device runs step k
        can_overlap = bool(getattr(self.backend, "overlaps", False))
        self.overlap = can_overlap if overlap is None else (overlap and can_overlap)
        self._inflight: deque[tuple[list[Choice], Any]] = deque()
        self.codec = codec
        self.max_len = self.backend.max_len
        self.vocab_size = self.backend.vocab_size
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.content_filter = content_filter
        self.prefill_tokens = prefill_tokens
        self.device = self.backend.device
        self._waiting: deque[Request] = deque()
        self._running: list[Choice] = []  # row i of the cache holds _running[i]
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._latency_ema = 1.0
        # counters read by /metrics (plain ints: written by the engine thread only)
        self.steps = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.busy_seconds = 0.0  # inside scheduler steps
        self.forward_seconds = 0.0  # inside the model's forward passes (prefill + decode)
        self.admitted_total = 0  # requests admitted into the running batch
        self.process_rss_bytes: int | None = None  # in this process: the process's own RSS metric covers it
        self.failure: str | None = None  # why the engine is gone (an engine process that exited); never set here
        self.queue_wait_seconds = 0.0  # their summed time from submit to admission
        # hooks for an engine in its own process (dsk.serving.engine_process): called on the
        # engine thread for each admitted request, and after every step (to ship its events)
        self.on_admit: Callable[[Request], None] | None = None
        self.after_step: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="dsk-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ stats
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue drained at the recent request rate."""
        return retry_after_s(len(self._waiting), len(self._running), self.max_batch_size, self._latency_ema)

    def cuda_memory(self) -> tuple[int, int] | None:
        """(allocated, peak allocated) bytes of torch's CUDA memory, when the engine runs on CUDA."""
        if getattr(self.device, "type", "cpu") != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)

    # ------------------------------------------------------------------ requests
    def check_lengths(self, n_prompt: int, max_tokens: int) -> None:
        """Raise ValueError with a client-facing message when a request cannot fit the context."""
        check_request(n_prompt, max_tokens, 1, max_len=self.max_len, max_batch_size=self.max_batch_size)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        *,
        n: int = 1,
        timeout_s: float | None = None,
        created: float | None = None,
    ) -> Request:
        """Queue a request; raises ValueError (bad lengths) or QueueFull. Never blocks.

        ``created``: when the request arrived (``time.monotonic()``, one clock for every process
        on Linux), if earlier than now: an engine process gets it from its API process."""
        check_request(len(prompt_ids), params.max_tokens, n, max_len=self.max_len,
                      max_batch_size=self.max_batch_size)
        check_vocab(prompt_ids, self.vocab_size)
        created = created if created is not None else time.monotonic()
        deadline = created + timeout_s if timeout_s else None  # the timeout counts from arrival
        req = Request(list(prompt_ids), params, n, on_event, deadline, id=next(self._ids), created=created)
        with self._cv:
            if self._stop or self._thread is None:
                raise EngineUnavailable("the engine is not running")
            if queue_full(len(self._waiting), len(self._running), max_queue=self.max_queue,
                          max_batch_size=self.max_batch_size):
                raise QueueFull(self.retry_after())
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
                 timeout_s: float | None = None) -> Result:
        """Blocking: the whole result of one request."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, params, events.put, n=n, timeout_s=timeout_s)
        return collect(iter_queue(events), n=n, request=req)

    def stream(self, prompt_ids: list[int], params: SamplingParams, *, timeout_s: float | None = None) -> Iterator[Event]:
        """Blocking iterator over one request's events; closing it early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, params, events.put, timeout_s=timeout_s)
        try:
            yield from iter_queue(events)
        finally:
            req.cancel()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running and not self._inflight:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a bug or device error: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {exc.__class__.__name__}: {exc}")
            if self.after_step is not None:
                self.after_step()
        self._fail_all("the server is shutting down", code=503)
        if self.after_step is not None:
            self.after_step()

    def _step(self) -> None:
        started = time.perf_counter()
        self._drop_finished_requests()
        self._admit()
        if self._running:
            self._decode()
        elif self._inflight:
            self._collect(keep=0)
        self.steps += 1
        self.busy_seconds += time.perf_counter() - started

    def _drop_finished_requests(self) -> None:
        now = time.monotonic()
        with self._cv:
            keep: deque[Request] = deque()
            for req in self._waiting:
                if req.cancelled:
                    self._emit(req, Event("error", text=CANCELLED, code=499))
                    continue
                if req.deadline is not None and now > req.deadline:
                    self._emit(req, Event("error", text="request timed out while waiting in the queue", code=504))
                    continue
                keep.append(req)
            self._waiting = keep
        for c in self._running:
            req = c.request
            if c.finish_reason is None and req.cancelled:
                c.finish_reason = "cancelled"
                # waiters (e.g. a handler whose client left) get an answer and stop waiting
                self._emit(req, Event("error", text=CANCELLED, code=499))
            elif c.finish_reason is None and req.deadline is not None and now > req.deadline:
                self._finish(c, "timeout")
        self._remove_finished()

    def _admit(self) -> None:
        free = self.max_batch_size - len(self._running)
        admitted: list[Request] = []
        budget = self.prefill_tokens
        with self._cv:
            while self._waiting and free > 0:
                req = self._waiting[0]
                if req.cancelled:
                    self._waiting.popleft()
                    self._emit(req, Event("error", text=CANCELLED, code=499))
                    continue
                cost = req.n * len(req.prompt_ids)
                if req.n > free or (admitted and cost > budget):
                    break
                self._waiting.popleft()
                admitted.append(req)
                free -= req.n
                budget -= cost
        if not admitted:
            return
        now = time.monotonic()
        self.admitted_total += len(admitted)
        new: list[Choice] = []
        for req in admitted:
            self.queue_wait_seconds += now - req.created
            if self.on_admit is not None:
                self.on_admit(req)
            for i in range(req.n):
                sampler = SequenceSampler(req.params, req.prompt_ids, self.vocab_size, seed_offset=i)
                new.append(Choice(req, i, sampler, pos=len(req.prompt_ids)))
            req.choices = new[-req.n:]
            req.open_choices = req.n
            self.prompt_tokens_total += len(req.prompt_ids)
        first_row = len(self._running)
        self._running.extend(new)  # before the forward pass: if it fails, _fail_all answers them too
        for row, c in enumerate(new, start=first_row):
            self.backend.set_row(row, c.sampler)
        if self.overlap:
            started = time.perf_counter()
            pending = self.backend.launch_prefill(first_row, [c.request.prompt_ids for c in new])
            self.forward_seconds += time.perf_counter() - started
            self._launched(new, pending)
            return
        tokens = self._prefill(first_row, [c.request.prompt_ids for c in new])
        for c, tok in zip(new, tokens):
            self._append(c, tok)
        self._remove_finished()

    def _prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]:
        started = time.perf_counter()
        tokens = self.backend.prefill(first_row, prompts)
        self.forward_seconds += time.perf_counter() - started
        return tokens

    def _decode(self) -> None:
        running = self._running
        if self.overlap:
            started = time.perf_counter()
            # each row's input token is already on the device (the last step's or the prefill's)
            pending = self.backend.launch_decode([c.pos for c in running])
            self.forward_seconds += time.perf_counter() - started
            for c in running:
                c.pos += 1
            self._launched(list(running), pending)
            self._collect(keep=1)  # the previous step's tokens, while this one runs
            return
        started = time.perf_counter()
        tokens = self.backend.decode([c.out_ids[-1] for c in running], [c.pos for c in running])
        self.forward_seconds += time.perf_counter() - started
        for c, tok in zip(running, tokens):
            c.pos += 1
            self._append(c, tok)
        self._remove_finished()

    def _launched(self, choices: list[Choice], pending: Any) -> None:
        """Book a launched step; a choice whose last token it is leaves the running batch now
        (its result is still in flight), so a finished sequence costs no extra step."""
        self._inflight.append((choices, pending))
        for c in choices:
            c.launched += 1
            if c.launched >= c.sampler.params.max_tokens:
                c.retired = True
        self._remove_finished()

    def _collect(self, keep: int) -> None:
        """Read and handle the tokens of every launched step but the newest ``keep``, in order."""
        while len(self._inflight) > keep:
            choices, pending = self._inflight[0]
            started = time.perf_counter()
            tokens = pending.result()
            self.forward_seconds += time.perf_counter() - started
            self._inflight.popleft()
            for c, tok in zip(choices, tokens):
                self._append(c, tok)  # a choice that already finished (stop, cancel) ignores it
        self._remove_finished()

    def _move_row(self, src: int, dst: int, length: int) -> None:
        self.backend.move_row(src, dst, length)

    def _remove_finished(self) -> None:
        """Compact: move the last running row into each finished row's slot."""
        i = 0
        while i < len(self._running):
            c = self._running[i]
            if c.finish_reason is None and not c.retired:
                i += 1
                continue
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                self._move_row(last, i, moved.pos)
                self._running[i] = moved
            self._running.pop()

    # ------------------------------------------------------------------ tokens → text → events
    def _append(self, c: Choice, token: int) -> None:
        req, p = c.request, c.sampler.params
        if c.finish_reason is not None:
            return
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        c.n_generated += 1
        self.generated_tokens_total += 1
        finish = None
        if token in self.codec.stop_ids and not p.ignore_eos:
            finish = "stop"
        else:
            c.out_ids.append(token)
            if c.n_generated >= p.max_tokens:
                finish = "length"
        old = len(c.text)
        text = c.text + self._new_text(c, final=finish is not None)
        if len(text) == old and finish is None:
            return  # no new text (a partial character, or a special token): nothing to check
        cut = None
        for s in p.stop:
            # text[:old] held no stop string, so a match must end in the new part
            at = text.find(s, max(old - len(s) + 1, 0))
            if at != -1 and (cut is None or at < cut):
                cut, finish = at, "stop"
        if self.content_filter is not None:
            hit = self.content_filter.check(text if cut is None else text[:cut], final=finish is not None)
            if hit is not None:
                cut, finish = hit.start, "content_filter"
        if cut is not None:
            text = text[:cut]
        c.text = text
        if finish is None:
            # send only what can no longer become a stop string or a blocked word
            safe = len(text) - max([_partial_suffix(text, s) for s in p.stop] + [0])
            if self.content_filter is not None:
                safe = min(safe, self.content_filter.safe_length(text))
            if safe > c.emitted:
                self._emit(req, Event("delta", c.index, text[c.emitted:safe]))
                c.emitted = safe
        else:
            self._finish(c, finish)

    def _new_text(self, c: Choice, *, final: bool) -> str:
        """The text that c.out_ids[c.read:] adds to ``codec.decode(c.out_ids)``.

        Decodes only a short window (the last complete piece as context, then the new ids), not
        the whole sequence each token; the sum of the pieces is exactly the whole decode. Ids
        ending in a partial UTF-8 character (a trailing U+FFFD) wait for the next token, unless
        the sequence ends here.
        """
        if c.read == len(c.out_ids):
            return ""
        before = self.codec.decode(c.out_ids[c.prefix:c.read]) if c.prefix < c.read else ""
        window = self.codec.decode(c.out_ids[c.prefix:])
        if not final and (window.endswith("\ufffd") or len(window) <= len(before)):
            return ""
        c.prefix, c.read = c.read, len(c.out_ids)
        return window[len(before):]

    def _finish(self, c: Choice, reason: str) -> None:
        req = c.request
        if c.emitted < len(c.text):
            self._emit(req, Event("delta", c.index, c.text[c.emitted:]))
            c.emitted = len(c.text)
        c.finish_reason = reason
        self._emit(req, Event("finish", c.index, finish_reason=reason))
        req.open_choices -= 1
        if req.open_choices == 0:
            completion = sum(ch.n_generated for ch in req.choices)
            usage = {
                "prompt_tokens": len(req.prompt_ids),
                "completion_tokens": completion,
                "total_tokens": len(req.prompt_ids) + completion,
            }
            elapsed = time.monotonic() - req.created
            self._latency_ema = 0.9 * self._latency_ema + 0.1 * elapsed
            self._emit(req, Event("done", usage=usage))

    def _emit(self, req: Request, event: Event) -> None:
        if req.done:
            return
        if event.kind in ("done", "error"):
            req.done = True
        try:
            req.on_event(event)
        except Exception:  # a consumer's problem must never stop the engine
            log.exception("event callback failed")

    def _fail_all(self, message: str, code: int = 500) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        inflight = [c for choices, _ in self._inflight for c in choices]
        requests = {id(c.request): c.request for c in [*self._running, *inflight]}
        self._running = []
        self._inflight.clear()
        for req in [*requests.values(), *waiting]:
            self._emit(req, Event("error", text=message, code=code))


# --------------------------------------------------------------------------- backends


class TorchBackend:
    """A dsk Transformer over one preallocated per-row KV cache (`model.new_cache`).

    The running batch occupies rows 0..n-1; each step reads and writes them in place, each row
    at its own position, and samples every row with its own settings (:class:`BatchSampler`,
    rows aligned with the cache's). Steps run one of two ways:

    - ``static`` (the default on CUDA): :class:`dsk.serving.graphs.StaticRunner`, fixed-shape
      steps with sampling inside, replayed as CUDA graphs: one host sync per step;
    - otherwise the model's own forward on a contiguous view of rows 0..n-1 (exactly
      ``model.generate``'s arithmetic; the CPU default, where launches cost nothing).
    """

    def __init__(self, model: Any, max_batch_size: int, device: str | torch.device | None = None,
                 *, absorb_mla: bool = True, static: bool | None = None):
        self.model = model
        # decode steps of MLA layers in the absorbed form (same function, far fewer FLOPs at batch > 1)
        self.absorbed_layers = 0
        if absorb_mla:
            from dsk.serving.fast_mla import install_absorbed_mla

            self.absorbed_layers = install_absorbed_mla(model)
        self.max_len = int(model.cfg.max_seq_len)
        self.vocab_size = int(model.cfg.vocab_size)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # one row more than the batch: scratch for the padding rows of a fixed-shape prefill
        rows = max_batch_size + 1
        self.cache = model.new_cache(batch_size=rows, max_len=self.max_len, device=self.device, dtype=dtype)
        self.sampling = BatchSampler(rows, self.vocab_size, self.device)
        self.runner = None
        from dsk.serving.graphs import StaticRunner, supports_static

        if static is None:
            static = self.device.type == "cuda"
        if static and supports_static(model):
            self.runner = StaticRunner(model, self.cache, self.sampling, max_batch_size=max_batch_size)

    @property
    def overlaps(self) -> bool:
        """Steps can be launched ahead of reading their tokens (the fixed-shape runner keeps each
        row's next input on the device)."""
        return self.runner is not None

    def launch_prefill(self, first_row: int, prompts: list[list[int]]) -> Any:
        return self.runner.launch_prefill(first_row, prompts)

    def launch_decode(self, positions: list[int]) -> Any:
        return self.runner.launch_decode(positions, self._sampling_mode(len(positions)))

    def _sampling_mode(self, n: int) -> str:
        """The cheapest decode-step sampling that rows 0..n-1 need (greedy, plain or full)."""
        return sampling_mode(self.sampling.needs(0, n))

    def rows(self, start: int, stop: int) -> Any:
        """A view of cache rows start..stop-1 that the model reads and writes in place."""
        view = copy.copy(self.cache)
        view.layers = [{name: t[start:stop] for name, t in layer.items()} for layer in self.cache.layers]
        view.batch_size = stop - start
        return view

    def set_row(self, row: int, sampler: SequenceSampler) -> None:
        self.sampling.set_row(row, sampler)

    def prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]:
        """Right-padded prompts through rows first_row..; the first sampled token of each.

        Padding writes junk into the cache past a row's prompt, but those positions are
        overwritten by the row's next tokens before any query can see them (the mask lets a
        query at position p see keys 0..p only).
        """
        if self.runner is not None:
            return self.runner.prefill(first_row, prompts)
        k = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = max(len(p) for p in prompts)
        idx = torch.zeros(k, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            idx[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        idx = idx.to(self.device)
        positions = torch.arange(width, device=self.device).expand(k, width)
        m = self.model
        # the trunk, then the head on each row's last real token only: full [k, T, V] logits
        # would cost k*T*V floats for nothing
        hidden, _, _ = m.trunk(m.embed(idx), positions, self.rows(first_row, first_row + k))
        last = hidden[torch.arange(k, device=self.device), lengths - 1]
        return self.sampling.sample(m.logits_of(last), first_row).tolist()

    def decode(self, tokens: list[int], positions: list[int]) -> list[int]:
        """One token for each of rows 0..n-1 at its own position; the sampled next tokens."""
        if self.runner is not None:
            return self.runner.decode(tokens, positions, self._sampling_mode(len(tokens)))
        n = len(tokens)
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        start = torch.tensor(positions, dtype=torch.long, device=self.device)
        logits = self.model(idx, cache=self.rows(0, n), start_pos=start).logits[:, -1]
        return self.sampling.sample(logits, 0).tolist()

    def move_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.cache.layers:
            for t in layer.values():
                t[dst, :length] = t[src, :length]
        self.sampling.move_row(src, dst)
        if self.runner is not None:
            self.runner.move_row(src, dst)


class OnnxBackend:
    """An exported ONNX decoder (`dsk export --format onnx`) in onnxruntime.

    The exported graph gives every row of a batch one shared past length, so rows at different
    positions cannot share a forward call: each sequence keeps its own cache and steps at
    batch 1. The scheduler (admission, streaming, limits) is the same as the torch backend's;
    only the batching gain is lost.
    """

    def __init__(self, lm: Any, max_batch_size: int):
        self.lm = lm
        self.max_len = int(lm.max_seq_len)
        self.vocab_size = int(lm.vocab_size)
        self.device = torch.device("cpu")
        self.past: list[Any] = [None] * max_batch_size
        self.sampling = BatchSampler(max_batch_size, self.vocab_size, self.device)

    def set_row(self, row: int, sampler: SequenceSampler) -> None:
        self.sampling.set_row(row, sampler)

    def prefill(self, first_row: int, prompts: list[list[int]]) -> list[int]:
        import numpy as np

        out = []
        for r, prompt in enumerate(prompts):
            logits, self.past[first_row + r] = self.lm.prefill(np.asarray([prompt], dtype=np.int64))
            out.append(torch.from_numpy(np.ascontiguousarray(logits[0])))
        return self.sampling.sample(torch.stack(out).float(), first_row).tolist()

    def decode(self, tokens: list[int], positions: list[int]) -> list[int]:
        import numpy as np

        out = []
        for r, tok in enumerate(tokens):
            logits, self.past[r] = self.lm.step(np.asarray([tok], dtype=np.int64), self.past[r])
            out.append(torch.from_numpy(np.ascontiguousarray(logits[0])))
        return self.sampling.sample(torch.stack(out).float(), 0).tolist()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.past[dst], self.past[src] = self.past[src], None
        self.sampling.move_row(src, dst)


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def iter_queue(events: "queue.Queue[Event]") -> Iterator[Event]:
    while True:
        ev = events.get()
        yield ev
        if ev.kind in ("done", "error"):
            return


def collect(events: Iterator[Event], *, n: int = 1, request: Request | None = None) -> Result:
    """Fold a request's events into one Result."""
    texts = ["" for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    for ev in events:
        if ev.kind == "delta":
            texts[ev.choice] += ev.text
            ids[ev.choice].extend(ev.token_ids)
        elif ev.kind == "finish":
            reasons[ev.choice] = ev.finish_reason
        elif ev.kind == "error":
            return Result([], {}, error=ev.text, code=ev.code)
        elif ev.kind == "done":
            ttft = None
            if request is not None and request.first_token_at is not None:
                ttft = request.first_token_at - request.created
            choices = [ChoiceResult(i, texts[i], ids[i], reasons[i]) for i in range(n)]
            if request is not None:  # the exact ids, including held-back text's tokens
                for ch in request.choices:
                    choices[ch.index].token_ids = list(ch.out_ids)
            return Result(choices, ev.usage or {}, ttft_s=ttft)
    return Result([], {}, error="the engine stopped", code=503)
