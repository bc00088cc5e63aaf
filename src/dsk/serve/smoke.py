"""`dsk serve --smoke-test`: start the server on a free port, send one chat request, check it, stop.

The result (status, latency, tokens, the answer) is written as `smoke.json` in a `serve`
artifact whose input is the model, so a pipeline rerun with nothing changed does not start
the server again.

    $ dsk serve quantize:latest --smoke-test
"""

from __future__ import annotations

import json

from dsk.runtime import StageContext


def build(ctx: StageContext) -> None:
    from dsk.serving.smoke import smoke_test

    if ctx.params.threads:
        import torch

        torch.set_num_threads(ctx.params.threads)
    result = smoke_test(ctx.input.path, device=ctx.params.device)
    (ctx.out / "smoke.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    ctx.kind = "smoke-test"
    ctx.metrics = {k: result[k] for k in ("ok", "status", "latency_s", "completion_tokens", "finish_reason")
                   if k in result}
    ctx.key_metric = "ok"
    ctx.log.info(f"smoke test passed: {ctx.input.stage} {ctx.input.id} answered "
                 f"{result.get('completion_tokens')} tokens in {result.get('latency_s', 0):.2f}s")
