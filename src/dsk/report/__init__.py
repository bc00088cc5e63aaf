"""`dsk report`: one self-contained HTML report card for an artifact and its whole lineage.

Cleaning counts and reasons, tokenizer statistics, training curves, the MoE expert-load
heatmap, finetuning, quantization and export numbers, evaluation results, serve benchmark
numbers where present, and the artifact graph; plots are matplotlib PNGs embedded in the
file, so it opens anywhere without a server.

    $ dsk report                     # the latest model/eval artifact's lineage
    $ dsk report best --title "Run 7"
"""

from __future__ import annotations

from pydantic import Field

from dsk.config import StageParams


class Params(StageParams):
    title: str = Field("dsk report card", description="Title at the top of the report.")
    max_curve_points: int = Field(2000, ge=10, le=100000, description="Downsample training curves to at most this many points.")
    include_manifests: bool = Field(True, description="Append each artifact's manifest (collapsed) to the report.")


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.artifacts import Store
    from dsk.runtime import resolve_inputs, run_stage

    store = store or Store.open()
    params = params or Params()
    inputs = resolve_inputs(store, "report", source)
    return run_stage(stage="report", params=params, inputs=inputs, build="dsk.report.build:build",
                     seed=seed, force=force, store=store, kind="report")
