"""`dsk serve` end to end: a real (tiny, randomly initialised) Transformer behind the HTTP API,
talked to with the official `openai` client and raw httpx.

A random model's text is gibberish, but every assertion here is about behaviour: shapes,
status codes, limits, and that each request gets exactly the tokens its settings ask for
(greedy = `model.generate`, a seed reproduces, batching does not change results).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch

from dsk.errors import DskError
from dsk.serving.app import ServerConfig, create_app
from dsk.serving.audit import AuditLog
from dsk.serving.engine_process import EngineProcess
from dsk.serving.filter import ContentFilter
from dsk.serving.loader import load_engine
from dsk.serving.sampling import SamplingParams
from dsk.serving.server import ServerThread

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "tinyshakespeare.txt"
KEY = "sk-test-key-123"
KEY2 = "sk-second-key-456"
MODEL = "tiny"
LONG = {"ignore_eos": True}  # a random model may emit a special token early; these must run long


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # decode steps are many tiny ops: on a busy 2-core machine OpenMP's spin-waits make two
    # threads several times slower than one (see docs/serve.md)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real model artifact payload: tiny DeepSeek-style Transformer + a trained BPE tokenizer."""
    from dsk.data.tokenizer import train_bpe
    from dsk.models import ModelConfig, Transformer, save_model

    out = tmp_path_factory.mktemp("model")
    paragraphs = SAMPLE.read_text(encoding="utf-8").split("\n\n")[:300]
    tok = train_bpe(paragraphs, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.get_vocab_size()))
    save_model(model, out, tokenizer=tok)
    return out


@contextmanager
def serving(model_dir, *, blocklist=None, audit=None, max_batch_size=4, max_queue=16, engine_process=False, **config):
    content_filter = ContentFilter.from_lines(blocklist) if blocklist else None
    if engine_process:  # `dsk serve --engine-process`: the engine core in a child process
        from dsk.serving.engine_process import EngineProcess
        from dsk.serving.text import TextCodec

        codec = TextCodec.from_artifact(model_dir)
        engine = EngineProcess("dsk.serving.engine_process:engine_from_artifact",
                               {"artifact_dir": str(model_dir), "max_batch_size": max_batch_size},
                               max_queue=max_queue, content_filter=content_filter, threads=1)
    else:
        engine, codec = load_engine(model_dir, max_batch_size=max_batch_size, max_queue=max_queue,
                                    content_filter=content_filter)
    config.setdefault("api_keys", (KEY, KEY2))
    app = create_app(engine, codec, ServerConfig(model_name=MODEL, **config), audit=audit)
    with ServerThread(app) as server:
        server.engine, server.codec = engine, codec
        yield server


# the engine in the server's process (a thread), or in its own (`--engine-process`)
MODES = pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])


@pytest.fixture(scope="module", params=[False, True], ids=["engine-thread", "engine-process"])
def server(model_dir, tmp_path_factory, request):
    audit_path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with serving(model_dir, blocklist=["badword", r"re:\bsecret-\d+\b"], audit=AuditLog(audit_path),
                 engine_process=request.param) as s:
        s.audit_path = audit_path
        yield s


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def headers(key=KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def greedy_text(model_dir, codec, ids, max_new_tokens, *, stop_at_special=False) -> str:
    """What `model.generate` gives at temperature 0, as text."""
    from dsk.models import load_model

    model, _, _ = load_model(model_dir)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, temperature=0)[0, len(ids):].tolist()
    if stop_at_special:
        cut = next((i for i, t in enumerate(out) if t in codec.stop_ids), len(out))
        out = out[:cut]
    return codec.decode(out)


def sse_lines(resp) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def wait_for(predicate, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- OpenAI client


def test_completion_with_openai_client(server, model_dir):
    ids = server.codec.encode("To be, or not")
    r = client(server).completions.create(model=MODEL, prompt="To be, or not", max_tokens=12, temperature=0,
                                          extra_body=LONG)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    assert r.choices[0].text == greedy_text(model_dir, server.codec, ids, 12)


def test_chat_with_openai_client(server, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    r = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                               extra_body=LONG)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ids = server.codec.chat_ids(messages)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    assert r.choices[0].message.content == greedy_text(model_dir, server.codec, ids, 10)


def test_streaming_chat_matches_non_streaming(server):
    c = client(server)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
                  temperature=0.9, seed=42, extra_body=LONG)
    full = c.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really streamed


def test_streaming_completion_ends_with_done(server):
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8, "stream": True, **LONG}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers(), timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        data = sse_lines(resp)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_wrong_or_missing_key_is_401_and_key_never_logged(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert KEY not in server.audit_path.read_text()


def test_filtered_prompt_is_400_with_reason(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "say the BadWord please"}], max_tokens=4)
    assert err.value.code == "content_filter" and "badword" in err.value.message
    r = httpx.post(server.url + "/v1/completions", headers=headers(),
                   json={"model": MODEL, "prompt": "my pin is secret-1234", "max_tokens": 4})
    assert r.status_code == 400 and "line 2" in r.json()["error"]["message"]
    # a word that merely contains a blocked word is not blocked
    ok = httpx.post(server.url + "/v1/completions", headers=headers(),
                    json={"model": MODEL, "prompt": "badwords", "max_tokens": 2})
    assert ok.status_code == 200


@MODES
def test_streamed_output_is_filtered(model_dir, engine_process):
    body = {"model": MODEL, "prompt": "First Citizen:", "max_tokens": 40, "temperature": 1.0, "seed": 11, **LONG}
    with serving(model_dir) as plain:
        full = httpx.post(plain.url + "/v1/completions", json=body, headers=headers(), timeout=60).json()
        full = full["choices"][0]["text"]
    # block a piece from the middle of what the model says with this seed
    piece = next((full[i:i + 3] for i in range(8, len(full) - 3) if full[i:i + 3].isalnum()), None)
    assert piece, f"nothing to block in {full!r}"
    with serving(model_dir, blocklist=["re:" + re.escape(piece)], engine_process=engine_process) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, headers=headers(),
                          timeout=60) as resp:
            chunks = [json.loads(d) for d in sse_lines(resp) if d != "[DONE]"]
    text = "".join(ch["choices"][0]["text"] for ch in chunks)
    assert piece.lower() not in text.lower()
    assert text == full[: full.lower().find(piece.lower())]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


# --------------------------------------------------------------------------- other endpoints


def test_models_health_metrics(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch_size"] == 4
    client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body=LONG)
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key: counted as a 401
    text = httpx.get(server.url + "/metrics").text
    for name in ('dsk_requests_total{endpoint="/v1/completions",status="200"}', "dsk_generated_tokens_total",
                 "dsk_prompt_tokens_total", "dsk_queue_depth", "dsk_running_batch_size",
                 "dsk_time_to_first_token_seconds_bucket", "dsk_request_latency_seconds_bucket",
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert re.search(r'dsk_requests_total\{endpoint="/v1/models",status="401"\} [1-9]', text)
    # every admitted request counts, with its wait from arrival to its batch row (in an engine
    # process too: the API process's arrival time travels with the request)
    admitted = float(re.search(r"^dsk_admitted_requests_total (\S+)$", text, re.M).group(1))
    waited = float(re.search(r"^dsk_queue_wait_seconds_total (\S+)$", text, re.M).group(1))
    assert admitted >= 1 and 0 < waited < 60 * admitted
    if isinstance(server.engine, EngineProcess):  # the engine process's memory is reported too
        assert re.search(r"^dsk_engine_process_resident_memory_bytes [1-9]", text, re.M)


def test_unknown_model_and_predict_without_table_model(server):
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    r = httpx.post(server.url + "/v1/predict", json={"rows": [{"a": 1}]}, headers=headers())
    assert r.status_code == 400 and "table model" in r.json()["error"]["message"]


def test_async_jobs(server):
    r = httpx.post(server.url + "/v1/jobs", headers=headers(),
                   json={"model": MODEL, "prompt": "Once", "max_tokens": 6, "temperature": 0, **LONG})
    assert r.status_code == 202
    job = r.json()
    assert job["object"] == "job" and job["status"] in ("queued", "running", "succeeded")

    def fetch():
        return httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=headers()).json()

    seen = fetch()
    while seen["status"] in ("queued", "running"):
        time.sleep(0.05)
        seen = fetch()
    assert seen["status"] == "succeeded"
    result = seen["result"]
    assert result["object"] == "text_completion" and result["usage"]["completion_tokens"] == 6
    direct = client(server).completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, extra_body=LONG)
    assert result["choices"][0]["text"] == direct.choices[0].text
    # handed out once; another key cannot see a job; chat jobs work too
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=headers()).status_code == 404
    chat = httpx.post(server.url + "/v1/jobs", headers=headers(),
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
    assert httpx.get(f"{server.url}/v1/jobs/{chat['id']}", headers=headers(KEY2)).status_code == 404
    wait_for(lambda: fetch_status(server, chat["id"]) == "succeeded", what="chat job")


def fetch_status(server, job_id):
    r = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers())
    if r.status_code != 200:
        return None
    return r.json()["status"]


def test_jobs_expire(model_dir):
    with serving(model_dir, job_ttl_s=0.3) as srv:
        job = httpx.post(srv.url + "/v1/jobs", headers=headers(),
                         json={"prompt": "x", "max_tokens": 2, **LONG}).json()
        wait_for(lambda: srv.engine.running == 0 and srv.engine.queue_depth == 0, what="job to finish")
        time.sleep(0.8)
        r = httpx.get(f"{srv.url}/v1/jobs/{job['id']}", headers=headers())
        assert r.status_code == 404 and "expired" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- limits


def test_bad_requests_are_400(server):
    def post(body):
        return httpx.post(server.url + "/v1/completions", headers=headers(), json={"model": MODEL, **body})

    r = post({"prompt": "Hi", "max_tokens": 10_000})
    assert r.status_code == 400 and "context of 256 tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_tokens"
    r = post({"prompt": "word " * 400, "max_tokens": 4})
    assert r.status_code == 400 and "the prompt is" in r.json()["error"]["message"]
    r = post({"prompt": "Hi", "temperature": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post({"prompt": "Hi", "logprobs": 3})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers(),
                   content=b"{not json", )
    assert r.status_code == 400


def test_body_too_large_is_413(model_dir):
    with serving(model_dir, max_body_bytes=2048) as srv:
        big = {"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1}
        r = httpx.post(srv.url + "/v1/completions", json=big, headers=headers())
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(srv.url + "/v1/completions", content=chunked(),
                       headers={**headers(), "Content-Type": "application/json"})
        assert r.status_code == 413
        assert httpx.post(srv.url + "/v1/completions", headers=headers(),
                          json={"model": MODEL, "prompt": "ok", "max_tokens": 1}).status_code == 200


@MODES
def test_full_queue_is_429_with_retry_after(model_dir, engine_process):
    with serving(model_dir, max_batch_size=1, max_queue=1, engine_process=engine_process) as srv:
        def job(tokens):
            return httpx.post(srv.url + "/v1/jobs", headers=headers(),
                              json={"prompt": "a", "max_tokens": tokens, **LONG})

        assert job(250).status_code == 202
        wait_for(lambda: srv.engine.running == 1, what="first request to run")
        assert job(250).status_code == 202  # waits in the queue
        r = httpx.post(srv.url + "/v1/completions", headers=headers(), json={"prompt": "b", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(srv).completions.create(model=MODEL, prompt="c", max_tokens=2)


@MODES
def test_request_timeout_is_504(model_dir, engine_process):
    with serving(model_dir, request_timeout_s=0.05, engine_process=engine_process) as srv:
        r = httpx.post(srv.url + "/v1/completions", headers=headers(), timeout=60,
                       json={"prompt": "a", "max_tokens": 250, **LONG})
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        wait_for(lambda: srv.engine.running == 0, timeout_s=5, what="the timed-out row to be freed")
        assert srv.engine.generated_tokens_total < 250


@MODES
def test_disconnect_frees_the_slot(model_dir, engine_process):
    with serving(model_dir, max_batch_size=1, engine_process=engine_process) as srv:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 250, "stream": True, **LONG}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=headers(), timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
        # the stream is closed after its first chunk
        wait_for(lambda: srv.engine.running == 0, timeout_s=5, what="the streaming slot to be freed")
        assert srv.engine.generated_tokens_total < 200
        before = srv.engine.generated_tokens_total
        # a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", headers=headers(), timeout=0.1,
                       json={"prompt": "b", "max_tokens": 250, **LONG})
        wait_for(lambda: srv.engine.running == 0, timeout_s=5, what="the waiting slot to be freed")
        assert srv.engine.generated_tokens_total - before < 200
        # and its handler has finished (no coroutine left waiting): it is counted as 499
        wait_for(lambda: 'endpoint="/v1/completions",status="499"' in httpx.get(srv.url + "/metrics").text,
                 timeout_s=5, what="the abandoned request's handler to finish")
        # and the slot serves the next request
        r = httpx.post(srv.url + "/v1/completions", headers=headers(), json={"prompt": "c", "max_tokens": 2, **LONG})
        assert r.status_code == 200


def _pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited, not yet reaped by init


def test_engine_process_crash_is_503_and_shutdown_leaves_no_process(model_dir):
    with serving(model_dir, max_batch_size=2, engine_process=True) as srv:
        pid = srv.engine.pid
        assert not _pid_gone(pid)
        body = {"model": MODEL, "prompt": "a", "max_tokens": 250, "stream": True, **LONG}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=headers(), timeout=60) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(pid, signal.SIGKILL)  # the engine crashes mid-stream
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        # the open stream ends with an error event and [DONE], not a hang
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert "engine process exited unexpectedly" in error["message"]
        r = httpx.post(srv.url + "/v1/completions", headers=headers(), json={"prompt": "b", "max_tokens": 2})
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
    with serving(model_dir, engine_process=True) as srv:
        proc = srv.engine._proc
        r = httpx.post(srv.url + "/v1/completions", headers=headers(), json={"prompt": "b", "max_tokens": 2})
        assert r.status_code == 200
    assert proc.poll() is not None  # stopped with the server


def test_engine_process_exits_when_its_api_process_is_gone(model_dir):
    from dsk.serving.engine_process import EngineProcess

    engine = EngineProcess("dsk.serving.engine_process:engine_from_artifact", {"artifact_dir": str(model_dir)},
                           threads=1)
    engine._conn.close()  # what the kernel does to the socket when the API process dies (even by SIGKILL)
    assert engine._proc.wait(timeout=30) == 0


def test_engine_process_gives_the_engine_threads_results(model_dir):
    """Outside an event loop the API side reads on a thread; seeds, stop strings and usage agree."""
    import queue

    from dsk.serving.engine import collect, iter_queue
    from dsk.serving.engine_process import EngineProcess

    remote = EngineProcess("dsk.serving.engine_process:engine_from_artifact",
                           {"artifact_dir": str(model_dir), "max_batch_size": 2}, threads=1).start()
    local, codec = load_engine(model_dir, max_batch_size=2)
    local.start()
    try:
        for params in (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       SamplingParams(temperature=1.0, seed=5, max_tokens=30, stop=("e ",), ignore_eos=True)):
            got = []
            for engine in (local, remote):
                q = queue.Queue()
                handle = engine.submit(codec.encode("ROMEO:"), params, q.put, n=2)
                got.append(collect(iter_queue(q), n=2, request=handle))
            assert [c.text for c in got[0].choices] == [c.text for c in got[1].choices]
            assert [c.finish_reason for c in got[0].choices] == [c.finish_reason for c in got[1].choices]
            assert got[0].usage == got[1].usage
    finally:
        local.stop()
        remote.stop()
    assert remote._proc.poll() is not None


def test_engine_process_stopped_on_its_event_loop_ends_open_requests(model_dir):
    import asyncio

    from dsk.serving.engine_process import EngineProcess
    from dsk.serving.text import TextCodec

    codec = TextCodec.from_artifact(model_dir)

    async def run():
        engine = EngineProcess("dsk.serving.engine_process:engine_from_artifact",
                               {"artifact_dir": str(model_dir)}, threads=1).start()  # reads on this loop
        events = asyncio.Queue()
        engine.submit(codec.encode("To be"), SamplingParams(max_tokens=250, ignore_eos=True), events.put_nowait)
        first = await asyncio.wait_for(events.get(), 30)
        engine.stop()  # on the loop itself: it cannot wait for the loop to read the last messages
        rest = []
        while not events.empty():
            rest.append(events.get_nowait())
        return engine, first, rest

    engine, first, rest = asyncio.run(run())
    assert first.kind == "delta"
    assert rest[-1].kind == "error" and rest[-1].code == 503 and "shutting down" in rest[-1].text
    assert engine._proc.poll() is not None and engine.failure == "the server is shutting down"


def test_engine_process_send_racing_its_death_is_503_not_a_crash(model_dir):
    """A submit whose send is under way when the engine process dies (and the reader closes the
    socket) ends as 503 (EngineUnavailable, or an error event), never another exception."""
    from dsk.serving.engine import EngineUnavailable
    from dsk.serving.text import TextCodec

    codec = TextCodec.from_artifact(model_dir)
    engine = EngineProcess("dsk.serving.engine_process:engine_from_artifact", {"artifact_dir": str(model_dir)},
                           threads=1, reader="thread").start()
    conn, entered = engine._conn, threading.Event()
    write = conn._send  # inside send_bytes, past its closed check

    def slow_write(buf, *args):
        entered.set()
        time.sleep(0.5)  # the child dies and the reader sees EOF meanwhile
        return write(buf, *args)

    conn._send = slow_write
    events, outcome = [], []

    def submit():
        try:
            outcome.append(engine.submit(codec.encode("a"), SamplingParams(max_tokens=2), events.append))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=submit)
    t.start()
    assert entered.wait(30)
    os.kill(engine.pid, signal.SIGKILL)
    t.join(30)
    engine.stop()
    assert isinstance(outcome[0], EngineUnavailable) or not isinstance(outcome[0], Exception), outcome
    if not isinstance(outcome[0], EngineUnavailable):  # sent in time: failed by the reader instead
        assert [(e.kind, e.code) for e in events] == [("error", 503)]


def test_engine_process_start_up_error_is_one_line(tmp_path):
    from dsk.serving.engine_process import EngineProcess

    with pytest.raises(DskError, match="holds no tokenizer.json"):
        EngineProcess("dsk.serving.engine_process:engine_from_artifact", {"artifact_dir": str(tmp_path)})


def test_engine_process_dying_at_start_up_is_one_line_and_leaves_no_socket():
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DskError, match=r"exited during start-up \(exit code 3\)"):
        EngineProcess("os:_exit", {"status": 3})  # the "engine factory" ends the child at once
    assert len(os.listdir("/proc/self/fd")) == fds


# --------------------------------------------------------------------------- sampling in one batch


def test_concurrent_requests_get_their_own_sampling(server, model_dir):
    c = client(server)
    prompt_a, prompt_b = "KING HENRY:", "What light through yonder"
    seeded = dict(model=MODEL, prompt=prompt_b, max_tokens=24, temperature=1.0, top_p=0.9, seed=7,
                  presence_penalty=0.5, frequency_penalty=0.3,
                  extra_body={"top_k": 50, "repetition_penalty": 1.2, **LONG})
    alone = c.completions.create(**seeded).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        greedy = pool.submit(c.completions.create, model=MODEL, prompt=prompt_a, max_tokens=24, temperature=0,
                             extra_body=LONG)
        again = pool.submit(c.completions.create, **seeded)
        other_seed = pool.submit(c.completions.create, **{**seeded, "seed": 8})
        hot = pool.submit(c.completions.create, model=MODEL, prompt=prompt_a, max_tokens=24, temperature=1.5,
                          seed=1, extra_body=LONG)
    ids_a = server.codec.encode(prompt_a)
    assert greedy.result().choices[0].text == greedy_text(model_dir, server.codec, ids_a, 24)
    assert again.result().choices[0].text == alone
    assert other_seed.result().choices[0].text != alone
    assert hot.result().choices[0].text != greedy.result().choices[0].text


def test_n_choices_and_stop_strings(server):
    r = client(server).completions.create(model=MODEL, prompt="To", max_tokens=12, n=3, seed=3, extra_body=LONG)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1  # each choice has its own stream of randomness
    assert r.usage.completion_tokens == 36
    full = client(server).completions.create(model=MODEL, prompt="To", max_tokens=20, temperature=0,
                                             extra_body=LONG).choices[0].text
    stop = full[5:7]
    cut = client(server).completions.create(model=MODEL, prompt="To", max_tokens=20, temperature=0, stop=[stop],
                                            extra_body=LONG).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


@pytest.mark.parametrize("static", [False, True], ids=["model-forward", "static-steps"])
def test_continuous_batching_short_requests_do_not_wait(model_dir, static):
    """Requests join and leave the running batch between decode steps; results stay exact
    (also through the fixed-shape steps that CUDA replays as graphs, run eagerly here)."""
    import queue

    from dsk.models import load_model
    from dsk.serving.engine import collect, iter_queue

    engine, codec = load_engine(model_dir, max_batch_size=2, static=static)
    engine.start()
    model, _, _ = load_model(model_dir)
    try:
        specs = {"long": ("ROMEO:", 80), "short": ("JULIET:", 5), "mid": ("Nurse:", 30)}
        order: list[str] = []
        queues, requests = {}, {}
        for name, (prompt, n) in specs.items():  # mid waits for a free row: the batch holds 2
            q = queue.Queue()

            def on_event(ev, name=name, q=q):
                if ev.kind == "done":
                    order.append(name)
                q.put(ev)

            queues[name] = q
            requests[name] = engine.submit(codec.encode(prompt), SamplingParams(temperature=0, max_tokens=n,
                                                                               ignore_eos=True), on_event)
        results = {name: collect(iter_queue(q), request=requests[name]) for name, q in queues.items()}
        assert order == ["short", "mid", "long"]
        for name, (prompt, n) in specs.items():
            ids = codec.encode(prompt)
            ref = model.generate(torch.tensor([ids]), max_new_tokens=n, temperature=0)[0, len(ids):].tolist()
            assert results[name].choices[0].token_ids == ref, name
    finally:
        engine.stop()


# --------------------------------------------------------------------------- audit log


def test_audit_log_has_no_prompt_by_default(server):
    client(server).completions.create(model=MODEL, prompt="audit me", max_tokens=2, extra_body=LONG)
    assert httpx.get(server.url + "/v1/models", headers=headers("sk-bad")).status_code == 401
    lines = [json.loads(line) for line in server.audit_path.read_text().splitlines()]
    mine = [rec for rec in lines if rec.get("prompt_sha256") == hashlib.sha256(b"audit me").hexdigest()]
    assert mine, "no audit line for the request"
    rec = mine[-1]
    assert rec["status"] == 200 and rec["endpoint"] == "/v1/completions" and rec["completion_tokens"] == 2
    assert rec["key_id"].startswith("key-") and rec["latency_ms"] >= 0 and rec["prompt_tokens"] >= 1
    assert "prompt" not in rec and "audit me" not in server.audit_path.read_text()
    assert any(r["status"] == 401 and r["key_id"] is None for r in lines), [(r["endpoint"], r["status"], r["key_id"]) for r in lines]


def test_audit_log_prompts_redacted(model_dir, tmp_path):
    path = tmp_path / "audit.jsonl"
    with serving(model_dir, audit=AuditLog(path, log_prompts=True, redact_pii=True)) as srv:
        client(srv).chat.completions.create(
            model=MODEL, max_tokens=2, extra_body=LONG,
            messages=[{"role": "user", "content": "mail jane.doe@example.com or call +1 415-555-0134"}])
    rec = json.loads(path.read_text().splitlines()[-1])
    content = rec["prompt"][0]["content"]
    assert "[EMAIL]" in content and "[PHONE]" in content
    assert "jane.doe" not in path.read_text() and "555-0134" not in path.read_text()
    assert isinstance(rec["output"], list)


# --------------------------------------------------------------------------- the stage and the CLI


@pytest.fixture
def model_artifact(workspace, model_dir):
    """A pretrain-stage artifact in the store, committed by the real runtime."""
    from dsk.artifacts import Store
    from dsk.config import StageParams
    from dsk.runtime import run_stage

    def build(ctx):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            shutil.copy(model_dir / name, ctx.out / name)
        ctx.kind = "model"

    return run_stage(stage="pretrain", params=StageParams(), inputs=[], build=build, store=Store.open()).artifact


def test_cli_serve_smoke_test(cli, model_artifact):
    code, out, err = cli("serve", "--smoke-test")
    assert code == 0, err
    assert "smoke test passed" in err and model_artifact.id in err
    code, out, err = cli("serve", "--smoke-test", "--json")
    assert code == 0, err
    result = json.loads(out)
    # the passed test is an artifact in the model's lineage: unchanged, it is not run again
    assert result["cached"] is True and result["kind"] == "smoke-test"
    assert result["metrics"]["ok"] is True and result["metrics"]["status"] == 200
    assert result["metrics"]["completion_tokens"] >= 1
    smoke = json.loads((Path(result["path"]) / "smoke.json").read_text())
    assert smoke["ok"] is True and smoke["finish_reason"] in ("stop", "length")
    code, out, err = cli("serve", "--smoke-test", "--force", "--json")
    assert code == 0 and json.loads(out)["cached"] is False


def test_smoke_test_function(model_dir):
    from dsk.serving import smoke_test

    result = smoke_test(model_dir)
    assert result["ok"] and result["status"] == 200 and result["completion_tokens"] >= 1


def test_cli_serve_errors(cli, workspace, model_artifact, tmp_path):
    code, _, err = cli("serve", "--backend", "onnx")
    assert code == 2 and "no ONNX export" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", "--blocklist", str(tmp_path / "missing.txt"))
    assert code == 2 and "blocklist" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("re:(unclosed\n")
    code, _, err = cli("serve", "--blocklist", str(bad))
    assert code == 2 and "line 1" in err
    code, _, err = cli("serve", "nosuchartifact")
    assert code == 2


def test_cli_serve_needs_a_model(cli):
    code, _, err = cli("serve")
    assert code == 2 and "no input for serve" in err


def test_cli_generate(cli, model_artifact, model_dir):
    code, out, err = cli("generate", model_artifact.id, "To be", "--temperature", "0", "--max-tokens", "8")
    assert code == 0, err
    from dsk.serving.text import TextCodec

    codec = TextCodec.from_artifact(model_dir)
    assert out == greedy_text(model_dir, codec, codec.encode("To be"), 8, stop_at_special=True) + "\n"


def test_cli_chat_local_and_remote(cli, model_artifact, model_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nhi again\n/exit\nnever sent\n"))
    code, out, err = cli("chat", model_artifact.id, "--max-tokens", "4", "--seed", "1")
    assert code == 0, err
    assert "/reset" in err and "conversation reset" in err
    assert len(out.splitlines()) == 2  # two replies, nothing after /exit
    with serving(model_dir) as srv:
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        code, out_remote, err = cli("chat", "--url", srv.url, "--api-key", KEY, "--max-tokens", "4", "--seed", "1")
        assert code == 0, err
        assert out_remote.splitlines()[0] == out.splitlines()[0]  # same seed, same reply, local or HTTP
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        code, _, err = cli("chat", "--url", srv.url, "--api-key", "wrong")
        assert code == 2 and "401" in err


@MODES
def test_dsk_serve_process(model_artifact, workspace, engine_process):
    """`dsk serve` in its own process: uvicorn on the given port, a key, then a clean stop (which
    also ends the engine process of `--engine-process`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DSK_HOME": str(workspace), "PYTHONPATH": str(REPO / "src"), "DSK_API_KEYS": "k1,k2"}
    proc = subprocess.Popen([sys.executable, "-m", "dsk", "serve", "--port", str(port), "--device", "cpu",
                             "--threads", "1", *(["--engine-process"] if engine_process else [])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read())
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=60, what="dsk serve to start")
        c = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        r = c.chat.completions.create(model=model_artifact.id, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3)
        assert r.choices[0].message.role == "assistant"
        assert c.models.list().data[0].id == model_artifact.id
        children = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d) == proc.pid]
        assert len(children) == (1 if engine_process else 0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15)
    assert "k1" not in proc.stderr.read()
    wait_for(lambda: all(_pid_gone(pid) for pid in children), timeout_s=10, what="the engine process to exit")


def _ppid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- the ONNX backend


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory):
    """An ONNX export of the tiny model (as `dsk export --format onnx` writes it) + its tokenizer."""
    onnx_export = pytest.importorskip("dsk.models.onnx_export")
    from dsk.models import load_model

    out = tmp_path_factory.mktemp("onnx")
    model, _, _ = load_model(model_dir)
    layout = onnx_export.export_onnx(model, out / "model.onnx")
    onnx_export.write_layout(layout, out)
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def test_onnx_backend_serves_the_same_greedy_text(onnx_dir, model_dir):
    engine, codec = load_engine(onnx_dir, max_batch_size=2)  # ONNX-only artifact: the ONNX backend
    assert type(engine.backend).__name__ == "OnnxBackend"
    app = create_app(engine, codec, ServerConfig(model_name=MODEL))
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(3) as pool:  # 3 requests, 2 rows: join, leave, rows move
            futures = {p: pool.submit(c.completions.create, model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                      extra_body=LONG)
                       for p, n in (("ROMEO:", 20), ("JULIET:", 6), ("Nurse:", 12))}
        for prompt, fut in futures.items():
            n = fut.result().usage.completion_tokens
            assert fut.result().choices[0].text == greedy_text(model_dir, codec, codec.encode(prompt), n), prompt
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True, extra_body=LONG))
        assert chunks[-1].choices[0].finish_reason == "length"


def test_backend_errors(model_dir, onnx_dir):
    with pytest.raises(DskError, match="no ONNX export"):
        load_engine(model_dir, backend="onnx")
    with pytest.raises(DskError, match="CPU"):
        load_engine(onnx_dir, backend="onnx", device="cuda")


@pytest.mark.parametrize("static", [False, True], ids=["model-forward", "static-steps"])
def test_engine_seeded_sampling_is_per_request(model_dir, static):
    """A seed gives the same tokens alone or in a batch with other settings; other seeds differ."""
    import queue

    from dsk.serving.engine import collect, iter_queue

    engine, codec = load_engine(model_dir, max_batch_size=4, static=static)
    engine.start()
    try:
        ids = codec.encode("ROMEO:")
        seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True,
                                presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
        alone = engine.generate(ids, seeded).choices[0].token_ids
        others = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                  SamplingParams(temperature=1.5, seed=1, max_tokens=9, ignore_eos=True),
                  seeded, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=8, max_tokens=16,
                                         ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.3,
                                         repetition_penalty=1.2)]
        queues = [queue.Queue() for _ in others]
        reqs = [engine.submit(codec.encode(p), params, q.put)
                for p, params, q in zip(["JULIET:", "Nurse:", "ROMEO:", "ROMEO:"], others, queues)]
        results = [collect(iter_queue(q), request=r).choices[0].token_ids for q, r in zip(queues, reqs)]
        assert results[2] == alone
        assert results[3] != alone
        assert len(results[0]) == 20 and len(results[1]) == 9
    finally:
        engine.stop()


def test_overlapped_static_steps_give_the_same_tokens(model_dir):
    """The fixed-shape runner with overlapped steps (each row's input token stays on the device
    and moves with its row when the batch is compacted) samples exactly what one step at a time
    does, for requests of different lengths and settings that finish at different steps."""
    import queue

    from dsk.serving.engine import collect, iter_queue

    def run(overlap):
        engine, codec = load_engine(model_dir, max_batch_size=4, static=True, overlap=overlap)
        assert engine.overlap is overlap
        engine.start()
        try:
            # greedy rows show a wrong input token at once (a random-init model's sampled rows
            # are mostly the seed's noise)
            settings = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                        SamplingParams(temperature=1.0, seed=3, max_tokens=11, ignore_eos=True),
                        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, repetition_penalty=1.3),
                        SamplingParams(temperature=1.2, seed=5, max_tokens=1, ignore_eos=True),
                        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
            queues = [queue.Queue() for _ in settings]
            reqs = [engine.submit(codec.encode(p), s, q.put)
                    for p, s, q in zip(["ROMEO:", "JULIET: O", "Nurse:", "A", "Enter", "KING"], settings, queues)]
            return [collect(iter_queue(q), request=r).choices[0] for q, r in zip(queues, reqs)]
        finally:
            engine.stop()

    sync, over = run(False), run(True)
    assert [c.token_ids for c in over] == [c.token_ids for c in sync]
    assert [c.text for c in over] == [c.text for c in sync]
    assert [len(c.token_ids) for c in over] == [3, 11, 7, 1, 9, 12]


def test_engine_process_default_follows_the_device():
    from dsk.serve.params import Params

    assert Params(device="cuda").use_engine_process() is True
    assert Params(device="cpu").use_engine_process() is False
    assert Params(device="cuda", backend="onnx").use_engine_process() is False
    assert Params(device="cuda", engine_process=False).use_engine_process() is False
    assert Params(device="cpu", engine_process=True).use_engine_process() is True
    assert Params(device="auto").use_engine_process() is torch.cuda.is_available()
