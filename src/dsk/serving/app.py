"""The HTTP API: OpenAI-compatible completions and chat (with SSE streaming), async jobs, metrics.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /v1/jobs`` + ``GET /v1/jobs/{id}``, ``POST /v1/predict`` (table models),
``GET /health`` and ``GET /metrics`` (Prometheus text; both without a key).
Every ``/v1/*`` call needs ``Authorization: Bearer KEY`` when keys are configured.

    $ dsk serve --port 8000 &
    $ curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "dsk", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dsk.errors import DskError
from dsk.serving.audit import AuditLog
from dsk.serving.auth import KeyChecker
from dsk.serving.engine import Engine, EngineUnavailable, Event, QueueFull, Result, collect
from dsk.serving.filter import ContentFilter
from dsk.serving.metrics import Metrics
from dsk.serving.sampling import SamplingParams

log = logging.getLogger("dsk.serving")


# --------------------------------------------------------------------------- request schemas


class _Sampling(BaseModel):
    """Sampling fields shared by completions and chat (OpenAI names + vLLM-style extras)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    user: str | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            stop=tuple(stop), ignore_eos=self.ignore_eos,
        )

    def reject_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
            if extra.get(name) not in (None, False, 0, {}, []):
                raise ApiError(400, f"{name!r} is not supported by this server", param=name)
        if extra.get("best_of") not in (None, 1):
            raise ApiError(400, "'best_of' is not supported by this server; use n", param="best_of")


class CompletionBody(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ApiError(400, f"message content of type {part.get('type')!r} is not supported; send text",
                                   param="messages")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------- server state


@dataclass
class Job:
    id: str
    key_id: str | None
    endpoint: str
    created: float
    status: str = "queued"  # queued | running | succeeded | failed
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished: float | None = None
    request: Any = None
    task: Any = None


@dataclass
class ServerConfig:
    model_name: str
    aliases: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    request_timeout_s: float = 120.0
    max_body_bytes: int = 1 << 20
    job_ttl_s: float = 600.0
    max_jobs: int = 1000
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(
    engine: Engine | None,
    codec: Any,
    config: ServerConfig,
    *,
    content_filter: ContentFilter | None = None,
    audit: AuditLog | None = None,
    predictor: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    owns_engine: bool = True,
) -> FastAPI:
    """The FastAPI app around a started-on-demand ``engine`` (None for a table-only server)."""
    keys = KeyChecker(list(config.api_keys))
    audit = audit or AuditLog(None)
    if content_filter is None and engine is not None:
        content_filter = engine.content_filter
    metrics = Metrics(engine)
    jobs: dict[str, Job] = {}
    served = {config.model_name, *config.aliases}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        sweeper = asyncio.create_task(_sweep_jobs())
        try:
            yield
        finally:
            sweeper.cancel()
            if engine is not None and owns_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="dsk serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.jobs = jobs

    # ------------------------------------------------------------------ plumbing
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(DskError)
    async def _dsk_error(request: Request, exc: DskError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = err.get("msg", "invalid request")
        where = ".".join(loc)
        return ApiError(400, f"{where}: {msg}" if where else msg, param=where or None).response()

    def authenticate(request: Request) -> str:
        kid = keys.check(request.headers.get("authorization"))
        request.state.key_id = kid
        if kid is None:
            raise ApiError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return kid

    def check_model(name: str | None) -> None:
        if name and name not in served:
            raise ApiError(404, f"model {name!r} not found; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def require_engine() -> Engine:
        if engine is None:
            raise ApiError(400, "this server serves a table model: use POST /v1/predict")
        return engine

    def check_prompt(texts: list[str], param: str) -> None:
        if content_filter is None:
            return
        for text in texts:
            hit = content_filter.check(text)
            if hit is not None:
                raise ApiError(400, f"the prompt was blocked by the content filter (blocklist rule "
                                    f"{hit.rule!r}, line {hit.line})", param=param, code="content_filter")

    # ------------------------------------------------------------------ request → engine
    def prepare_completion(body: CompletionBody) -> tuple[list[int], SamplingParams, Any]:
        body.reject_unsupported()
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (got a batch of "
                                    f"{len(prompt)}); use n for several completions", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_prompt([prompt], "prompt")
            ids = codec.completion_ids(prompt)
            shown: Any = prompt
        else:
            ids = list(prompt)
            shown = codec.decode(ids)
            check_prompt([shown], "prompt")
        return ids, body.sampling(body.max_tokens or 16), shown

    def prepare_chat(body: ChatBody) -> tuple[list[int], SamplingParams, Any]:
        body.reject_unsupported()
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        check_prompt([m["content"] for m in messages], "messages")
        eng = require_engine()
        ids = codec.chat_ids(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(eng.max_len - len(ids), 1)
        params = body.sampling(max_tokens)
        if codec.chat_stop:
            params = dataclasses.replace(params, stop=tuple(dict.fromkeys(params.stop + codec.chat_stop)))
        return ids, params, messages

    def submit(request: Request, ids: list[int], params: SamplingParams, n: int,
               on_event: Callable[[Event], None], param: str) -> Any:
        eng = require_engine()
        try:
            return eng.submit(ids, params, on_event, n=n, timeout_s=config.request_timeout_s)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc), code="engine_unavailable") from None
        except ValueError as exc:
            name = "max_tokens" if "max_tokens" in str(exc) else ("n" if str(exc).startswith("n=") else param)
            raise ApiError(400, str(exc), param=name, code="context_length_exceeded" if "context" in str(exc) else None) from None

    def async_queue() -> tuple[asyncio.Queue[Event], Callable[[Event], None]]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        return events, bridge(events.put_nowait)

    bridges: dict[int, LoopBridge] = {}

    def bridge(deliver: Callable[[Event], None]) -> Callable[[Event], None]:
        loop = asyncio.get_running_loop()
        b = bridges.get(id(loop))
        if b is None or b.loop is not loop:
            b = bridges[id(loop)] = LoopBridge(loop)
        return lambda ev: b.send(deliver, ev)

    async def run_to_end(request: Request | None, events: asyncio.Queue[Event], handle: Any, n: int,
                         started: float, endpoint: str) -> Result:
        """Collect events; cancel the request at once if the client disconnects while waiting."""
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle)) if request is not None else None
        got: list[Event] = []
        first = None
        try:
            while True:
                ev = await events.get()
                if ev.kind == "delta" and first is None:
                    first = time.monotonic()
                    metrics.ttft.observe(first - started)
                got.append(ev)
                if ev.kind in ("done", "error"):
                    break
        finally:
            if watcher is not None:
                watcher.cancel()
        result = collect(iter(got), n=n, request=handle)
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return result

    async def cancel_on_disconnect(request: Request, handle: Any) -> None:
        # the body has been read, so the next ASGI message can only be the client leaving
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return

    def result_error(result: Result) -> ApiError | None:
        if result.error:
            return ApiError(result.code, result.error)
        if any(c.finish_reason == "timeout" for c in result.choices):
            return ApiError(504, f"the request took longer than the server's {config.request_timeout_s:g}s timeout",
                            code="timeout")
        return None

    def completion_json(rid: str, result: Result) -> dict[str, Any]:
        return {
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": config.model_name,
            "choices": [{"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in result.choices],
            "usage": result.usage, "system_fingerprint": None,
        }

    def chat_json(rid: str, result: Result) -> dict[str, Any]:
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": config.model_name,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in result.choices],
            "usage": result.usage, "system_fingerprint": None,
        }

    def note(request: Request, **fields: Any) -> None:
        request.state.audit = {**getattr(request.state, "audit", {}), **fields}

    async def respond(request: Request, kind: str, body: Union[CompletionBody, ChatBody]) -> Response:
        started = time.monotonic()
        endpoint = request.url.path
        ids, params, shown = prepare_completion(body) if kind == "completion" else prepare_chat(body)
        note(request, prompt=shown, prompt_tokens=len(ids), model=config.model_name)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)
        events, on_event = async_queue()
        handle = submit(request, ids, params, body.n, on_event, "prompt" if kind == "completion" else "messages")
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            gen = stream_events(request, kind, rid, events, handle, body.n, started, endpoint, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await run_to_end(request, events, handle, body.n, started, endpoint)
        err = result_error(result)
        if err is not None:
            raise err
        note(request, completion_tokens=result.usage.get("completion_tokens"),
             output=[c.text for c in result.choices],
             finish_reasons=[c.finish_reason for c in result.choices])
        return JSONResponse(completion_json(rid, result) if kind == "completion" else chat_json(rid, result))

    async def stream_events(request: Request, kind: str, rid: str, events: asyncio.Queue[Event], handle: Any,
                            n: int, started: float, endpoint: str, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": config.model_name,
                                       "choices": choices, "system_fingerprint": None}
            if include_usage:
                payload["usage"] = usage
            return f"data: {sse_json(payload)}\n\n"

        def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "completion":
                return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        # a text delta's chunk is the same JSON each time but for the text: serialise it once per
        # choice around a placeholder and splice the text in (byte-identical to json.dumps)
        templates: dict[int, tuple[str, str]] = {}
        marker = "\x00dsk-text\x00"
        marker_json = json.dumps(marker)

        def delta_chunk(index: int, text: str) -> str:
            t = templates.get(index)
            if t is None:
                head, _, tail = chunk([choice(index, marker, None)]).partition(marker_json)
                t = templates[index] = (head, tail)
            return t[0] + sse_json(text) + t[1]

        first = None
        outputs = [""] * n
        reasons: list[str | None] = [None] * n
        try:
            if kind == "chat":
                yield chunk([choice(i, "", None, role=True) for i in range(n)])
            finished = False
            while not finished:
                # everything already waiting goes out in one write, and consecutive deltas of one
                # choice in one chunk: a stream that fell behind the engine catches up with fewer,
                # larger sends instead of one send (and one JSON chunk) per token
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                pending: list[str] = []
                text_of, texts = -1, []
                for ev in batch:
                    if ev.kind == "delta":
                        if first is None:
                            first = time.monotonic()
                            metrics.ttft.observe(first - started)
                        outputs[ev.choice] += ev.text
                        if texts and text_of != ev.choice:
                            pending.append(delta_chunk(text_of, "".join(texts)))
                            texts = []
                        text_of = ev.choice
                        texts.append(ev.text)
                        continue
                    if texts:
                        pending.append(delta_chunk(text_of, "".join(texts)))
                        texts = []
                    if ev.kind == "finish":
                        reasons[ev.choice] = ev.finish_reason
                        if ev.finish_reason == "timeout":
                            err = ApiError(504, f"the request took longer than the server's "
                                                f"{config.request_timeout_s:g}s timeout", code="timeout")
                            note(request, stream_error=err.message)
                            pending.append(f"data: {json.dumps(err.body())}\n\n")
                            handle.cancel()
                            finished = True
                            break
                        pending.append(chunk([choice(ev.choice, None if kind == "chat" else "", ev.finish_reason)]))
                    elif ev.kind == "error":
                        note(request, stream_error=ev.text)
                        pending.append(f"data: {json.dumps(ApiError(ev.code, ev.text).body())}\n\n")
                        finished = True
                        break
                    elif ev.kind == "done":
                        note(request, completion_tokens=(ev.usage or {}).get("completion_tokens"))
                        if include_usage:
                            pending.append(chunk([], ev.usage))
                        finished = True
                        break
                if texts:
                    pending.append(delta_chunk(text_of, "".join(texts)))
                if finished:
                    pending.append("data: [DONE]\n\n")
                if pending:
                    yield "".join(pending).encode()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        finally:
            # also reached when the client disconnects mid-stream: free the slot at once
            handle.cancel()
            note(request, output=outputs, finish_reasons=reasons)

    # ------------------------------------------------------------------ routes
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        authenticate(request)
        return await respond(request, "completion", body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        authenticate(request)
        return await respond(request, "chat", body)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authenticate(request)
        data = [{"id": name, "object": "model", "created": config.created, "owned_by": "dsk"}
                for name in [config.model_name, *[a for a in config.aliases if a != config.model_name]]]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Any:
        failure = engine.failure if engine else None  # an engine process that exited
        body = {
            "status": "ok" if failure is None else "error",
            "model": config.model_name,
            "queue_depth": engine.queue_depth if engine else 0,
            "running": engine.running if engine else 0,
            "max_batch_size": engine.max_batch_size if engine else 0,
        }
        if failure is not None:
            return JSONResponse({**body, "error": failure}, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus() -> Response:
        text, content_type = metrics.render()
        return PlainTextResponse(text, media_type=content_type)

    # ------------------------------------------------------------------ async jobs
    def job_view(job: Job) -> dict[str, Any]:
        return {"id": job.id, "object": "job", "status": job.status, "created": int(job.created),
                "endpoint": job.endpoint, "result": job.result, "error": job.error}

    def expire_jobs() -> None:
        now = time.time()
        for jid in [j.id for j in jobs.values() if now - (j.finished or j.created) > config.job_ttl_s]:
            job = jobs.pop(jid)
            if job.request is not None:
                job.request.cancel()

    async def _sweep_jobs() -> None:
        while True:
            await asyncio.sleep(max(min(config.job_ttl_s / 4, 30.0), 0.05))
            expire_jobs()

    async def run_job(job: Job, kind: str, n: int, events: asyncio.Queue[Event], handle: Any) -> None:
        started = time.monotonic()
        job.request = handle
        try:
            result = await run_to_end(None, events, handle, n, started, "/v1/jobs")
            err = result_error(result)
            if err is not None:
                job.status, job.error = "failed", err.body()["error"]
            else:
                job.status = "succeeded"
                job.result = completion_json(job.id, result) if kind == "completion" else chat_json(job.id, result)
        except Exception as exc:  # never lose a job silently
            job.status, job.error = "failed", {"message": f"{exc.__class__.__name__}: {exc}", "type": "server_error"}
        finally:
            job.finished = time.time()
            job.request = None

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        kid = authenticate(request)
        expire_jobs()
        if len(jobs) >= config.max_jobs:
            raise ApiError(429, f"too many unfetched jobs ({config.max_jobs}); fetch results first",
                           code="too_many_jobs", headers={"Retry-After": "5"})
        try:
            raw = await request.json()
        except json.JSONDecodeError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise ApiError(400, "the body must be a JSON object: a completion or chat completion request")
        from pydantic import ValidationError

        kind = "chat" if "messages" in raw else "completion"
        try:
            body: Union[ChatBody, CompletionBody] = (ChatBody if kind == "chat" else CompletionBody).model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise ApiError(400, f"{where}: {err.get('msg')}", param=where or None) from None
        if body.stream:
            raise ApiError(400, "a job cannot stream; poll GET /v1/jobs/{id}", param="stream")
        ids, params, shown = prepare_completion(body) if kind == "completion" else prepare_chat(body)  # type: ignore[arg-type]
        note(request, prompt=shown, prompt_tokens=len(ids), job=True)
        job = Job(id="job-" + secrets.token_hex(12), key_id=kid,
                  endpoint="/v1/completions" if kind == "completion" else "/v1/chat/completions",
                  created=time.time())
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(ev: Event) -> None:
            if job.status == "queued":
                job.status = "running"  # the engine has admitted it
            events.put_nowait(ev)

        handle = submit(request, ids, params, body.n, bridge(deliver),
                        "prompt" if kind == "completion" else "messages")
        jobs[job.id] = job
        job.request = handle
        job.task = asyncio.create_task(run_job(job, kind, body.n, events, handle))  # held: tasks are weakly referenced
        note(request, job_id=job.id)
        return JSONResponse(job_view(job), status_code=202)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        kid = authenticate(request)
        expire_jobs()
        job = jobs.get(job_id)
        if job is None or (keys.enabled and job.key_id != kid):
            raise ApiError(404, f"job {job_id!r} not found (unknown, expired, or already fetched)", code="job_not_found")
        if job.status in ("succeeded", "failed"):
            jobs.pop(job_id, None)  # a finished job is handed out once
        return job_view(job)

    # ------------------------------------------------------------------ table models
    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        authenticate(request)
        if predictor is None:
            raise ApiError(400, "this server serves a language model; /v1/predict needs a table model artifact "
                                "(use /v1/completions or /v1/chat/completions)", code="unsupported_model")
        try:
            raw = await request.json()
        except json.JSONDecodeError:
            raise ApiError(400, "the body is not valid JSON") from None
        rows = raw.get("rows") if isinstance(raw, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ApiError(400, 'send {"rows": [{column: value, ...}, ...]}', param="rows")
        try:
            out = await asyncio.to_thread(predictor, rows)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="rows") from None
        return JSONResponse(out)

    app.add_middleware(AuditMiddleware, audit=audit, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    return app


# characters that JSON leaves raw (with ensure_ascii=False) but that line splitters such as
# str.splitlines (httpx's aiter_lines) break an SSE data line at: escaped, as JSON allows
_SSE_UNSAFE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(value: Any) -> str:
    """``value`` as JSON for one SSE data line: UTF-8 text stays raw, but no character that any
    client could take for a line break (control characters are escaped by json already)."""
    return json.dumps(value, ensure_ascii=False).translate(_SSE_UNSAFE)


class LoopBridge:
    """Hands engine events (engine thread) to the event loop with one wake-up per burst.

    A decode step emits one event per running sequence; waking the loop once per step rather
    than once per event saves a self-pipe write and a loop iteration per token, and so GIL
    time the engine thread would otherwise wait for.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[Callable[[Event], None], Event]] = []
        self._scheduled = False
        self._lock = threading.Lock()
        self._loop_thread = threading.get_ident()  # made on the loop (by the app's handlers)

    def send(self, deliver: Callable[[Event], None], event: Event) -> None:
        if threading.get_ident() == self._loop_thread:
            deliver(event)  # already on the loop (an engine process's reader): no hand-over
            return
        with self._lock:
            self._pending.append((deliver, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for deliver, event in pending:
            deliver(event)


# --------------------------------------------------------------------------- ASGI middleware


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``: by Content-Length, or counted as it arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                           code="body_too_large").response()
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await too_big(scope, receive, send)
        # read it all (bounded) and replay, so a chunked upload cannot get past the limit
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AuditMiddleware:
    """Counts every request by endpoint and status, and writes one audit line per /v1 call."""

    def __init__(self, app: Any, audit: AuditLog, metrics: Metrics):
        self.app, self.audit, self.metrics = app, audit, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        status = 500
        path = scope.get("path", "")
        endpoint = "/v1/jobs/{id}" if path.startswith("/v1/jobs/") else path
        if endpoint not in ENDPOINTS:
            endpoint = "other"
        scope.setdefault("state", {})
        logged = False

        def finish() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if path.startswith("/v1/"):
                state = scope["state"]
                fields = dict(state.get("audit", {}))
                prompt, output = fields.pop("prompt", None), fields.pop("output", None)
                self.audit.write(endpoint=endpoint, status=status, key_id=state.get("key_id"), prompt=prompt,
                                 output=output, method=scope.get("method"),
                                 latency_ms=round((time.monotonic() - started) * 1000, 1), **fields)

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            finish()


ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/jobs", "/v1/jobs/{id}",
             "/v1/predict", "/health", "/metrics"}
