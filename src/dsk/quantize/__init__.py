"""`dsk quantize`: 16/8/4-bit versions of a model artifact, each evaluated against its parent.

    $ dsk quantize --bits 8                          # int8 weight-only, per-channel scales
    $ dsk quantize --bits 4 --group-size 64          # int4 group-wise, two values per byte
    $ dsk quantize --bits 8 --scheme static          # + uint8 activations calibrated on val data
    $ dsk quantize --bits 8 --backend onnx           # onnxruntime int8 (dynamic or static QDQ)

Every run records in its manifest: file size and ratio to fp32, validation perplexity and bits
per byte and their change versus the parent, and greedy decode tokens/s on this CPU.
"""

from dsk.quantize.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.artifacts import Store
    from dsk.runtime import resolve_inputs, run_stage

    store = store or Store.open()
    params = params or Params()
    check_params(params)
    inputs = resolve_inputs(store, "quantize", source)
    if getattr(inputs[0], "kind", None) == "table-model":  # issue 12: the table classifier
        from dsk.tabular.stage import run_quantize

        return run_quantize(inputs=inputs, params=params, seed=seed, force=force, store=store)
    return run_stage(
        stage="quantize", params=params, inputs=inputs, build="dsk.quantize.build:build",
        seed=seed, force=force, store=store, stage_version="1",
    )


def check_params(p: Params) -> None:
    """Option combinations that cannot work: a one-line error before anything runs."""
    from dsk.errors import DskError

    if p.backend == "onnx":
        if p.bits != 8:
            raise DskError(f"--backend onnx supports --bits 8 only (onnxruntime int8), not {p.bits}; use --backend torch for 16/4 bits")
        if p.scheme not in ("dynamic", "static"):
            raise DskError(f"--backend onnx supports --scheme dynamic or static, not {p.scheme!r}")
    elif p.bits != 8 and p.scheme != "weight-only":
        raise DskError(f"--bits {p.bits} supports only --scheme weight-only, not {p.scheme!r}; dynamic/static are 8-bit schemes")


__all__ = ["Params", "run", "check_params"]
