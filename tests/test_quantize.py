"""`dsk quantize`: int4 packing, quantized linears, quantized models' perplexity, the stage end to end."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import quantize_helpers as helpers
from dsk.artifacts import Store
from dsk.errors import DskError
from dsk.models import ModelConfig, Transformer, load_model, save_model
from dsk.models.quant import (
    QuantLinear,
    calibrate,
    dequantize_int4,
    pack_int4,
    quantize_int4_groupwise,
    quantize_model,
    unpack_int4,
)


# module fixtures (one torch thread, a briefly trained tiny model, a CLI on its store)
from quantize_helpers import _one_thread, shared_cli, trained  # noqa: E402,F401


# --------------------------------------------------------------------------- units


def test_int4_pack_unpack_round_trip():
    q = torch.randint(0, 16, (7, 6, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 6, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(torch.tensor([[1, 2]])), torch.tensor([[0x21]], dtype=torch.uint8))
    with pytest.raises(DskError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int4_groupwise_error_is_bounded_by_one_step():
    w = torch.randn(32, 128)
    packed, scales, zeros = quantize_int4_groupwise(w, 32)
    deq = dequantize_int4(packed, scales, zeros, 32)
    step = scales.float().repeat_interleave(32, dim=1)
    err = (deq - w).abs()
    assert (err <= step + 1e-4).all()  # a rounded zero point can clip a group's extreme by < 1 step
    assert float((err <= step / 2 + 1e-4).float().mean()) > 0.98  # everything else: half a step
    assert packed.numel() == w.numel() // 2


@pytest.mark.parametrize(
    "bits,scheme,group,tol",
    [(8, "weight-only", None, 0.01), (8, "dynamic", None, 0.02), (8, "static", None, 0.03),
     (4, "weight-only", 16, 0.10), (4, "weight-only", 32, 0.12), (4, "weight-only", 128, 0.15)],
)
def test_quantized_linear_is_close_to_float(bits, scheme, group, tol):
    torch.manual_seed(0)
    w, x = torch.randn(64, 256) * 0.05, torch.randn(5, 7, 256)
    ref = x @ w.T
    q = QuantLinear.from_float(w, bits=bits, scheme=scheme, group_size=group)
    if scheme == "static":
        q.calibrating = True
        q(x)
        q.finish_calibration()
    y = q(x)
    assert y.shape == ref.shape
    rel = float((y - ref).norm() / ref.norm())
    assert rel < tol, rel
    # the int kernel path (bf16 or int8 activations) and the fp32 dequantize-then-matmul path agree
    deq = x @ q.dequantized_weight().T
    assert float((y - deq).norm() / deq.norm()) < (0.01 if scheme == "weight-only" else 0.03)


def test_quantized_model_has_bounded_perplexity_change(trained):
    from dsk.evaluation.lm import evaluate_lm

    _, tokens, art = trained
    model, _, _ = load_model(art.path)
    base = evaluate_lm(model, tokens.path, 2, batch_size=4)
    for kw, limit in ((dict(bits=8), 0.5), (dict(bits=8, scheme="dynamic"), 1.0), (dict(bits=4, group_size=32), 5.0)):
        q = quantize_model(model, **kw)
        got = evaluate_lm(q, tokens.path, 2, batch_size=4)
        change = 100 * (got["perplexity"] - base["perplexity"]) / base["perplexity"]
        assert abs(change) < limit, (kw, change)
        assert got["perplexity"] < 0.5 * 256  # far better than chance: the model is trained
    assert base["bpb"] == pytest.approx(base["val_loss"] / 0.6931471805599453, rel=1e-6)  # 1 byte per token


def test_quantized_artifact_loads_transparently(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=128, max_seq_len=64)).eval()
    idx = torch.randint(0, 128, (2, 12))
    for kw in (dict(bits=16, float_dtype="bfloat16"), dict(bits=8, scheme="static"), dict(bits=4, group_size=32, quantize_head=True)):
        q = quantize_model(model, **kw)
        if kw.get("scheme") == "static":
            calibrate(q, [idx])
        save_model(q, tmp_path / str(kw["bits"]))
        loaded, _, _ = load_model(tmp_path / str(kw["bits"]))
        assert loaded.quant_config == q.quant_config
        assert torch.equal(loaded(idx).logits, q(idx).logits)
        # cached generation works on the quantized model
        assert loaded.generate(idx[:1, :4], 6, temperature=0).shape == (1, 10)
    cfg = json.loads((tmp_path / "4" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert ModelConfig.from_dict(cfg).dim == 64  # readers of config.json that ignore quantization still work


# --------------------------------------------------------------------------- the stage


def test_quantize_end_to_end_and_cache_hit(shared_cli, trained):
    store, tokens, art = trained
    args = ["quantize", art.id, "--bits", "4", "--group-size", "32", "--eval-batches", "2",
            "--eval-batch-size", "4", "--bench-tokens", "4", "--json"]
    code, out, err = shared_cli(*args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["cached"] is False and summary["kind"] == "model"
    q = store.resolve(summary["id"])
    assert sorted(e["path"] for e in q.manifest["files"]) == ["config.json", "log.txt", "model.safetensors"]
    m = q.metrics
    assert (m["bits"], m["scheme"], m["group_size"]) == (4, "weight-only", 32)
    assert m["size_bytes"] == (q.path / "model.safetensors").stat().st_size
    assert 0.1 < m["size_ratio_fp32"] < 0.3
    assert m["tokens_artifact"] == tokens.id
    for key in ("perplexity", "parent_perplexity", "perplexity_change_pct", "bpb", "bpb_change", "decode_tokens_per_s"):
        assert m[key] == m[key], key  # present and not NaN
    assert abs(m["perplexity_change_pct"]) < 5
    loaded, _, _ = load_model(q.path)
    assert loaded.quant_config.bits == 4
    code, out, _ = shared_cli(*args)
    assert code == 0 and json.loads(out)["cached"] is True and json.loads(out)["id"] == q.id


def test_quantize_static_records_change_vs_parent(trained):
    import dsk.quantize as quantize

    store, _, art = trained
    r = quantize.run(source=art.id, params=quantize.Params(bits=8, scheme="static", eval_batches=2,
                                                          eval_batch_size=4, calib_batches=1, bench_tokens=0),
                     store=store)
    m = r.artifact.metrics
    assert m["scheme"] == "static" and abs(m["perplexity_change_pct"]) < 2
    assert "decode_tokens_per_s" not in m
    loaded, _, _ = load_model(r.artifact.path)
    scales = [mod.act_scale.item() for mod in loaded.modules() if isinstance(mod, QuantLinear)]
    assert scales and all(s != 1.0 for s in scales)  # calibrated, not the defaults


def test_quantize_onnx_backend_dynamic(trained):
    import dsk.quantize as quantize
    from dsk.models.onnx_runtime import OnnxLM

    store, _, art = trained
    r = quantize.run(source=art.id, params=quantize.Params(bits=8, scheme="dynamic", backend="onnx", eval_batches=1,
                                                          eval_batch_size=2, bench_tokens=4), store=store)
    a = r.artifact
    assert sorted(e["path"] for e in a.manifest["files"]) == ["config.json", "log.txt", "model.onnx", "onnx.json"]
    m = a.metrics
    assert m["backend"] == "onnx" and m["size_ratio_fp32"] < 0.75 and abs(m["perplexity_change_pct"]) < 2
    for key in ("torch_fp32_decode_tokens_per_s", "ort_fp32_decode_tokens_per_s", "ort_int8_decode_tokens_per_s"):
        assert m[key] > 0
    lm = OnnxLM(a.path)
    assert lm.layout["quantization"]["scheme"] == "dynamic"
    assert lm.generate([[1, 2, 3]], 5).shape == (1, 8)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "bits=3"], "expected one of 16, 8, 4"),
        (["--bits", "4", "--set", "group_size=48"], "expected one of 16, 32, 64, 128"),
        (["--bits", "4", "--group-size", "128"], "does not divide the layer width 192"),
        (["--bits", "4", "--scheme", "static"], "--bits 4 supports only --scheme weight-only"),
        (["--bits", "4", "--backend", "onnx"], "--backend onnx supports --bits 8"),
        (["--bits", "8", "--backend", "onnx"], "--scheme dynamic or static"),
    ],
)
def test_quantize_bad_options_are_one_line_errors(shared_cli, trained, args, needle):
    store, _, art = trained
    before = {a.id for a in store.iter_artifacts("quantize")}
    code, out, err = shared_cli("quantize", art.id, "--eval-batches", "1", *args)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert {a.id for a in store.iter_artifacts("quantize")} == before


def test_quantize_choice_options_name_the_choices(shared_cli, trained):
    _, _, art = trained
    code, _, err = shared_cli("quantize", art.id, "--bits", "3")
    assert code == 2 and "'16', '8', '4'" in err
    code, _, err = shared_cli("quantize", art.id, "--bits", "4", "--group-size", "48")
    assert code == 2 and "'16', '32', '64', '128'" in err


def test_quantize_refuses_quantized_input_and_missing_onnxruntime(shared_cli, trained, monkeypatch):
    store, _, art = trained
    code, out, _ = shared_cli("quantize", art.id, "--bits", "16", "--eval-batches", "1", "--bench-tokens", "0", "--json")
    assert code == 0
    qid = json.loads(out)["id"]
    code, _, err = shared_cli("quantize", qid, "--eval-batches", "1")
    assert code == 2 and "already quantized" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    code, _, err = shared_cli("quantize", art.id, "--backend", "onnx", "--scheme", "dynamic", "--eval-batches", "1")
    assert code == 2 and "onnxruntime is not installed" in err


def test_quantize_needs_a_tokens_lineage(shared_cli, trained, tmp_path):
    from dsk.runtime import run_stage

    store, _, _ = trained
    orphan = run_stage(stage="pretrain", params=helpers.ModelParams(steps=0), inputs=[], store=store,
                       build="quantize_helpers:build_model_without_data").artifact
    code, _, err = shared_cli("quantize", orphan.id)
    assert code == 2 and "no featurize `tokens` artifact" in err
