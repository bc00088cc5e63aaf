"""A minimal stage used by the foundation tests to exercise the store, runtime and runner.

It writes ``out.txt`` (its input's content, repeated ``n`` times) so that its output depends on
its input and params; ``sleep`` and ``fail`` let tests interrupt it mid-build.
"""

from __future__ import annotations

import time

from pydantic import Field

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
    ctx.kind = "text"
    ctx.metrics = {"chars": len(text) * ctx.params.n}
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
