"""`dsk serve`: serve a model artifact over an OpenAI-compatible HTTP API (continuous batching,
streaming, async jobs, API keys, a content filter, an audit log, Prometheus metrics).

Not an artifact-producing stage: it resolves the model (default: the latest export, quantize,
finetune or pretrain artifact) and runs the server until stopped (`run` returns None; with
`--smoke-test` it returns the smoke test's result dict). The engine and the API live
in the library, `dsk.serving`.

    $ dsk serve --port 8000 --max-batch-size 16 --api-key secret
    $ dsk serve 3f2a9c1b7d4e --blocklist blocklist.txt --audit-log audit.jsonl
    $ dsk serve --smoke-test          # start, send one chat request, check it, stop
"""

from dsk.serve.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.serve.stage import run as _run

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store)


__all__ = ["Params", "run"]
