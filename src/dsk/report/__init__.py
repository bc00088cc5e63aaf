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
    include_related: bool = Field(True, description="Also show exports, quantizations and evaluations made from the lineage's models.")


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.artifacts import Store
    from dsk.runtime import resolve_inputs, run_stage

    store = store or Store.open()
    params = params or Params()
    inputs = resolve_inputs(store, "report", source)
    # exports, quantizations and evaluations made from any artifact of the lineage (but not on it)
    # are shown too; they are inputs of the report so that a new one changes its cache key
    related = related_artifacts(store, inputs[0]) if params.include_related else []
    return run_stage(stage="report", params=params, inputs=inputs, build="dsk.report.build:build",
                     seed=seed, force=force, store=store, kind="report", extra_inputs=related)


RELATED_STAGES = ("export", "quantize", "eval")


def related_artifacts(store, target):
    """Artifacts of RELATED_STAGES made directly from a member of ``target``'s lineage, not on it."""
    lineage = store.ancestors(target) if hasattr(target, "id") else set()
    related = [a for stage in RELATED_STAGES for a in store.iter_artifacts(stage)
               if a.id not in lineage and any(i in lineage for i in a.input_ids)]
    return sorted(related, key=lambda a: (a.stage, a.id))
