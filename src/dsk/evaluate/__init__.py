"""`dsk eval`: measure any model variant the same way, as an `eval` artifact in its lineage.

Language models (trained, finetuned, quantized, or ONNX-exported): validation loss,
perplexity and bits per byte on the held-out shards of the model's own featurize artifact,
exact match on held-out finetuning tasks where they exist, and greedy samples for a fixed
list of prompts. Table models (and their ONNX exports): ROC-AUC, F1, accuracy and a
calibration curve on the validation rows, or on a labelled CSV given with `--data`.

    $ dsk eval                                    # the latest model/export artifact
    $ dsk eval table-model-id --data data/new.csv
    $ dsk eval --compare pretrain:latest quantize:latest export:latest
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from dsk.config import StageParams

DEFAULT_PROMPTS = ("ROMEO:", "To be, or not to be", "First Citizen:\nWe are accounted poor citizens")


class Params(StageParams):
    max_batches: int = Field(16, ge=1, le=100000, description="Language models: validation batches (of 8 windows) to score.")
    tasks: Optional[str] = Field(None, description="Held-out instruction JSONL for exact match (default: heldout.jsonl beside the finetuning data in the lineage, if any).")
    task_examples: int = Field(32, ge=0, description="How many held-out tasks to score by exact match (0 = skip).")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest greedy answer for exact match and samples.")
    prompts: list[str] = Field(list(DEFAULT_PROMPTS), description="Prompts whose greedy continuations are saved as samples.")
    data: Optional[str] = Field(None, description="Table models: a labelled CSV/parquet to evaluate on (default: the model's validation rows).")
    threads: int = Field(0, ge=0, description="torch / onnxruntime CPU threads (0 = default).")


def run(*, source=None, params=None, seed=0, force=False, store=None, compare=None):
    """Evaluate one artifact; with ``compare`` (a list of refs) evaluate each and return a table."""
    from dsk.evaluate.stage import compare as _compare
    from dsk.evaluate.stage import run as _run

    params = params or Params()
    if compare:
        return _compare(refs=list(compare), params=params, seed=seed, force=force, store=store)
    return _run(source=source, params=params, seed=seed, force=force, store=store)


__all__ = ["Params", "run", "DEFAULT_PROMPTS"]
