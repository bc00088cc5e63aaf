"""`dsk export`: a model artifact as an ONNX decoder graph, a Hugging Face checkpoint or plain safetensors.

    $ dsk export --format onnx           # one graph with past key/values, verified in onnxruntime
    $ dsk export --format hf             # LlamaForCausalLM / DeepseekV3ForCausalLM directory
    $ dsk export --format safetensors    # weights + config only

The ONNX export verifies itself (max |logit diff| vs torch <= 1e-4 on random prompts, 32 greedy
tokens identical with the KV cache) and fails without writing an artifact when it does not hold.
"""

from dsk.export.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.artifacts import Store
    from dsk.runtime import resolve_inputs, run_stage

    store = store or Store.open()
    params = params or Params()
    inputs = resolve_inputs(store, "export", source)
    if getattr(inputs[0], "kind", None) == "table-model":  # issue 12: the table classifier
        from dsk.tabular.stage import run_export

        return run_export(inputs=inputs, params=params, seed=seed, force=force, store=store)
    return run_stage(
        stage="export", params=params, inputs=inputs, build="dsk.export.build:build",
        seed=seed, force=force, store=store, stage_version="1",
    )


__all__ = ["Params", "run"]
