"""The fast paths behind GPU training, checked on CPU: grouped expert matmuls, the sort-based
MoE dispatch (against a per-token reference, values and gradients), and the GPU presets."""

from __future__ import annotations

import pytest
import torch

from dsk.models import ModelConfig, Transformer


def test_grouped_experts_match_the_per_expert_loop():
    from dsk.models.model import Experts

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    torch.manual_seed(0)
    experts = Experts(4, 32, 16)
    for w in experts.parameters():
        torch.nn.init.normal_(w, 0, 0.2)
    counts = torch.tensor([5, 0, 9, 2])  # an expert with no tokens too
    x = torch.randn(int(counts.sum()), 32)
    ends = counts.cumsum(0).to(torch.int32)
    try:
        fast = experts.grouped(x, ends, torch.bfloat16).float()
    except (RuntimeError, NotImplementedError) as exc:  # no CPU kernel in this build
        pytest.skip(f"torch._grouped_mm has no CPU kernel here: {exc}")
    xb = x.bfloat16()
    slow, start = [], 0
    for e, n in enumerate(counts.tolist()):
        w1, w2, w3 = (w[e].bfloat16() for w in (experts.w1, experts.w2, experts.w3))
        h = xb[start:start + n]
        slow.append(torch.nn.functional.linear(torch.nn.functional.silu(h @ w1.T) * (h @ w3.T), w2).float())
        start += n
    slow = torch.cat(slow)
    assert float((fast - slow).norm() / slow.norm()) < 2e-2


def test_moe_dispatch_matches_a_per_token_reference():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=50)
    moe = Transformer(cfg).layers[1].ffn
    h = torch.randn(2, 16, cfg.dim, requires_grad=True)
    y, counts, _ = moe(h)
    flat = h.reshape(-1, cfg.dim)
    weights, ids, _ = moe.gate(flat)
    rows = []
    for t in range(flat.shape[0]):
        row = moe.shared_experts(flat[t:t + 1])[0]
        for j in range(ids.shape[1]):
            row = row + weights[t, j] * moe.experts.expert(int(ids[t, j]), flat[t:t + 1])[0]
        rows.append(row)
    ref = torch.stack(rows)
    torch.testing.assert_close(y.reshape(-1, cfg.dim), ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts).tolist()
    grad_fast = torch.autograd.grad(y.square().sum(), h)[0]
    grad_ref = torch.autograd.grad(ref.square().sum(), h)[0]
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-4, atol=1e-6)


def test_gpu_presets_have_gpt2_size_and_equal_active_width():
    dense = Transformer(ModelConfig.preset("gpt2", vocab_size=50304, n_layers=2, n_dense_layers=2))
    moe = Transformer(ModelConfig.preset("gpt2-moe", vocab_size=50304, n_layers=2))
    # same embedding, attention and (active) feed-forward width: active counts differ only by the router
    router = moe.cfg.n_routed_experts * moe.cfg.dim
    assert moe.num_params(active=True) - router == dense.num_params()
    assert moe.num_params() > 3 * dense.num_params() - 2 * 50304 * 768
