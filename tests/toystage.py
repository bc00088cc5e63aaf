"""A minimal stage used by the foundation tests to exercise the store, runtime and runner.

It writes ``out.txt`` (its input's content, repeated ``n`` times) so that its output depends on
its input and params; ``sleep`` and ``fail`` let tests interrupt it mid-build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import Field

from dsk import tracking
from dsk.artifacts import Artifact
from dsk.config import StageParams
from dsk.errors import DskError
from dsk.registry import StageSpec
from dsk.runtime import resolve_inputs, run_stage

SPEC_RAW = StageSpec("toy", "A toy stage.", "toystage", (), implemented=True, accepts_raw=True)
SPEC_NEXT = StageSpec("toynext", "A toy stage after toy.", "toystage", ("toy",), implemented=True)


class Params(StageParams):
    n: int = Field(1, ge=1, le=100, description="How many times to repeat the input.")
    note: str = Field("", description="Free text (changes the cache key).")
    sleep: float = Field(0.0, description="Seconds to sleep mid-build (for kill tests).")
    fail: bool = Field(False, description="Raise mid-build (for atomicity tests).")
    x: float = Field(0.0, description="A knob for tuning tests: loss = (x - 0.3)^2.")


def _maybe_hang() -> None:
    """With TOY_HANG_DIR set, the second build call hangs (so a test can kill it there)."""
    hang_dir = os.environ.get("TOY_HANG_DIR")
    if not hang_dir:
        return
    calls = Path(hang_dir)
    calls.mkdir(exist_ok=True)
    n = len(list(calls.glob("call-*"))) + 1
    (calls / f"call-{n}").write_text("")
    if n == 2:
        (calls / "hanging").write_text("")
        time.sleep(120)


def _read_input(ctx) -> str:
    inp = ctx.input
    if isinstance(inp, Artifact):
        return (inp.path / "out.txt").read_text()
    texts = [f.read_text() for f in inp.files]
    if not any(t.strip() for t in texts):
        raise DskError(f"input {inp.path} has no text; give a non-empty file")
    return "".join(texts)


def _build(ctx) -> None:
    text = _read_input(ctx)
    (ctx.out / "out.txt").write_text(text * ctx.params.n)
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "count.txt").write_text(str(len(text)))
    if ctx.params.sleep:
        time.sleep(ctx.params.sleep)
    if ctx.params.fail:
        raise RuntimeError("injected failure")
    _maybe_hang()
    loss = (ctx.params.x - 0.3) ** 2
    for step in range(3):  # intermediate metrics, as a trainer would report them
        tracking.report(step, {"loss": loss + (2 - step) * 0.1})
    ctx.kind = "text"
    ctx.metrics = {"chars": len(text) * ctx.params.n, "loss": loss}
    ctx.key_metric = "chars"


def run(*, source=None, params=None, seed=0, force=False, store=None, stage="toy"):
    from dsk.artifacts import Store

    store = store or Store.open()
    params = params or Params()
    inputs = resolve_inputs(store, stage, source)
    return run_stage(stage=stage, params=params, inputs=inputs, build="toystage:_build", seed=seed, force=force, store=store)


def as_module(stage: str):
    """What ``load_stage`` returns for a toy stage: its Params and a run bound to its name."""
    import functools
    import types

    return types.SimpleNamespace(Params=Params, run=functools.partial(run, stage=stage))
