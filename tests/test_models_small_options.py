"""The small-model options used by the CPU presets (qk_norm, relu2, logit softcap, zero-init
outputs) and the CPU fp32 attention under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from dsk.errors import DskError
from dsk.models import ModelConfig, Transformer
from dsk.models.model import attention

V = 97


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny-dense", vocab_size=V, **kw))


def test_qk_norm_adds_per_head_norms_and_stays_causal():
    model = make(qk_norm=True).eval()
    names = {n for n, _ in model.named_parameters()}
    assert "layers.0.attn.q_norm.weight" in names and "layers.0.attn.k_norm.weight" in names
    assert model.num_params() == make().num_params() + 2 * 2 * model.cfg.head_dim  # 2 layers x (q, k) norms
    idx = torch.randint(0, V, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % V
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_relu2_mlp_has_no_gate_projection_and_squares_relu():
    model = make(mlp_act="relu2", inter_dim=96)
    mlp = model.layers[0].ffn
    assert not hasattr(mlp, "w3")
    x = torch.randn(3, 5, model.cfg.dim)
    expected = mlp.w2(torch.relu(mlp.w1(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)


def test_logit_softcap_bounds_logits():
    model = make(logit_softcap=2.0).eval()
    with torch.no_grad():
        model.head.weight.mul_(100.0)  # tied: huge logits without the cap
        logits = model(torch.randint(0, V, (2, 8))).logits
    assert logits.abs().max() <= 2.0
    assert logits.abs().max() > 1.5


def test_zero_init_out_makes_each_block_start_as_the_identity():
    model = make(zero_init_out=True)
    for block in model.layers:
        assert not block.attn.wo.weight.any() and not block.ffn.w2.weight.any()
    h = torch.randn(2, 6, model.cfg.dim)
    positions = torch.arange(6).expand(2, 6)
    out, _, _ = model.trunk(h, positions)
    torch.testing.assert_close(out, h)
    # and it still learns: the output projections get gradients
    model(torch.randint(0, V, (2, 6)), targets=torch.randint(0, V, (2, 6))).loss.backward()
    assert model.layers[0].ffn.w2.weight.grad.abs().sum() > 0


def test_cpu_attention_runs_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bad, msg", [
    (dict(mlp_act="gelu"), "mlp_act"),
    (dict(qk_norm=True, attn="mla"), "qk_norm"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
])
def test_small_option_errors_are_one_line(bad, msg):
    with pytest.raises(DskError, match=msg) as err:
        ModelConfig.preset("tiny-dense", vocab_size=V, **bad)
    assert "\n" not in str(err.value)


def test_hf_export_refuses_options_llama_lacks():
    from dsk.models.hf import hf_architecture

    assert hf_architecture(ModelConfig.preset("tiny-dense")) == "LlamaForCausalLM"
    with pytest.raises(DskError, match="qk_norm"):
        hf_architecture(ModelConfig.preset("tiny-dense", qk_norm=True))


def test_linear_and_wsd_lr_schedules():
    from dsk.train import lr_at

    assert lr_at(50, base_lr=1.0, warmup=10, min_ratio=0.0, progress=0.25, decay="linear") == pytest.approx(0.75)
    # WSD: the peak held for the first 70% of the decay phase, then linear to the floor
    wsd = dict(base_lr=1.0, warmup=10, min_ratio=0.0, decay="linear", cooldown=0.3)
    assert lr_at(50, progress=0.6, **wsd) == pytest.approx(1.0)
    assert lr_at(50, progress=0.85, **wsd) == pytest.approx(0.5)
    assert lr_at(50, progress=1.0, **wsd) == pytest.approx(0.0)
    assert lr_at(5, progress=0.0, **wsd) == pytest.approx(0.6)  # warmup unchanged
