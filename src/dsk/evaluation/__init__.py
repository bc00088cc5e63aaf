"""Evaluation helpers shared by stages (`dsk quantize`, `dsk eval`, `dsk finetune`): language-model
metrics, decode speed (:mod:`dsk.evaluation.lm`), exact match and preference accuracy on chat
tasks (:mod:`dsk.evaluation.tasks`).

    >>> from dsk.evaluation.lm import evaluate_lm
    >>> evaluate_lm(model, ".dsk/artifacts/featurize/<id>", max_batches=8)
"""
