"""Evaluation helpers shared by stages (`dsk quantize`, `dsk eval`): language-model metrics, decode speed.

    >>> from dsk.evaluation.lm import evaluate_lm
    >>> evaluate_lm(model, ".dsk/artifacts/featurize/<id>", max_batches=8)
"""
