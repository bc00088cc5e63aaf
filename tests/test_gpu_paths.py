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


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,options", [
    ("tiny-dense", {}),
    ("cpu-moe", {}),
    # the CPU-recipe options combined with the fast paths: QK-norm and ReLU^2 inside the fused
    # projections, soft-capped logits sending the loss back to the plain head
    ("cpu-moe", {"qk_norm": True, "mlp_act": "relu2", "logit_softcap": 30.0}),
])
def test_fused_paths_compute_the_same_loss_and_gradients(preset, options):
    """use_fused(): q|k|v and w1|w3 as one GEMM, the LM head fused with the loss: same function."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=97, max_seq_len=32, **options)
    model = Transformer(cfg).train()
    idx = torch.randint(0, 97, (3, 32))
    targets = torch.randint(0, 97, (3, 32))
    targets[0, :5] = -100  # ignored positions (finetuning's masked prompts)
    ref = model(idx, targets=targets)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loads = {i: m.load.clone() for i, m in model.moe_layers().items()}

    model.use_fused()
    out = model(idx, targets=targets)
    if not options.get("logit_softcap"):
        assert out.logits is None  # the fused head never materialises them
    out.loss.backward()
    assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.aux["ce_loss"], ref.aux["ce_loss"], rtol=1e-5, atol=1e-6)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name
    for i, m in model.moe_layers().items():  # the same routing too
        assert torch.equal(m.load, 2 * loads[i])

    model.eval()  # scoring and generation keep their logits
    with torch.no_grad():
        assert model(idx, targets=targets).logits is not None
    model.use_fused(False)
    assert model.fused_loss is False and not any(getattr(m, "fuse_projections", False) for m in model.modules())


def test_fused_head_loss_in_chunks_with_a_scaled_backward():
    from dsk.models.model import head_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (10,))
    t[3] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=-100)
    (3.0 * ref).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = head_cross_entropy(h, w, t, chunk_rows=4)  # 3 chunks, the last one short
    (3.0 * fused).backward()
    assert torch.allclose(fused, ref, atol=1e-6)
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)
    # every target ignored: loss 0 and zero gradients, like F.cross_entropy's sum over nothing
    none = head_cross_entropy(h, w, torch.full((10,), -100), chunk_rows=4)
    assert float(none) == 0.0


def test_bf16_residual_stream_changes_only_the_precision():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-dense", vocab_size=97, max_seq_len=32)).train()
    idx = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 stream is for autocast runs
        ref = model(idx, targets=idx).loss
        model.residual_dtype = torch.bfloat16
        low = model(idx, targets=idx).loss
    assert abs(float(low) - float(ref)) < 0.05 * float(ref) and float(low) != float(ref)


def test_rope_in_either_memory_order_is_the_same_rotation():
    from dsk.models.model import apply_rope, rope_tables

    torch.manual_seed(0)
    cos, sin = rope_tables(8, 16, 10000.0)
    pos = torch.arange(16).expand(2, 16)
    x = torch.randn(2, 3, 16, 8)  # [B, H, T, D]
    a = apply_rope(x, cos[pos], sin[pos])
    b = apply_rope(x.transpose(1, 2).contiguous(), cos[pos], sin[pos], head_dim=2).transpose(1, 2)
    assert torch.equal(a, b)


def _head_loss_kernel_vs_torch(device: str, onepass: bool = False) -> None:
    """The Triton cross-entropy kernel (two sweeps, or one pass) inside head_cross_entropy against the
    PyTorch expression."""
    import dsk.models.model as M

    torch.manual_seed(0)
    n, d, v = 37, 32, 9001  # no multiple of any block size: 2-3 chunks, the last one padded
    h = torch.randn(n, d, device=device, requires_grad=True)
    w = (0.3 * torch.randn(v, d, device=device)).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    t[[0, 5, 6]] = -100
    with torch.no_grad():  # row 9's target far below its max (loss > 30): the one-pass kernel's redo
        w[t[9]] = -w[(h[9] @ w.T).argmax()] * 40 / float(h[9] @ w[(h[9] @ w.T).argmax()])
    out = {}
    keep = M.cross_entropy_onepass
    for kernel in (False, True):
        M.triton_cross_entropy = kernel
        M.cross_entropy_onepass = onepass
        try:
            loss = M.head_cross_entropy(h, w, t, chunk_rows=16)  # 3 chunks, the last one short
            (2.0 * loss).backward()
        finally:
            M.triton_cross_entropy = True
            M.cross_entropy_onepass = keep
        out[kernel] = (loss.detach(), h.grad.clone(), w.grad.clone())
        h.grad = w.grad = None
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-6, atol=0)  # fp32 sums: a few ulps apart
    for a, b in zip(out[True][1:], out[False][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cross_entropy_kernel_in_triton_interpreter():
    """The kernel's arithmetic on CPU, through Triton's interpreter (skipped where Triton is absent)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    # each config alone: per-chunk and per-lane running statistics, forward and reversed second sweep,
    # with and without eviction hints; the one-pass kernel likewise (with a row that takes its redo)
    code = ("import dsk.models.ce_kernel as K, tests.test_gpu_paths as T\n"
            "K.available = lambda t: True\n"
            "import triton\n"
            "configs = list(K._ce_rows_kernel.configs)[:2] + [triton.Config(\n"
            "    {'BLOCK': 4096, 'LANES': 0, 'REVERSE': 0, 'EVICT': 0}, num_warps=8)]\n"
            "for c in configs:\n"
            "    K._ce_rows_kernel.configs = [c]\n"
            "    K._ce_rows_kernel.cache.clear()\n"
            "    T._head_loss_kernel_vs_torch('cpu')\n"
            "for c in K._ce_onepass_kernel.configs[:2]:\n"
            "    K._ce_onepass_kernel.configs = [c]\n"
            "    K._ce_onepass_kernel.cache.clear()\n"
            "    T._head_loss_kernel_vs_torch('cpu', onepass=True)\n"
            # a target outside the vocabulary reads nothing and poisons its row's loss
            "import torch\n"
            "loss, _ = K.cross_entropy_rows(torch.randn(3, 50).bfloat16(), torch.tensor([50, -100, -3]),\n"
            "                               torch.tensor([1.0]), -100)\n"
            "assert torch.isnan(loss[0]) and loss[1] == 0 and torch.isnan(loss[2]), loss\n"
            "loss, p, r = K.cross_entropy_rows_onepass(torch.randn(3, 50).bfloat16(), torch.tensor([50, -100, -3]),\n"
            "                                          torch.tensor([1.0]), -100)\n"
            "assert torch.isnan(loss[0]) and loss[1] == 0 and torch.isnan(loss[2]), loss\n"
            "assert r[1] == 0 and not p[1].any()\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]


def test_fp16_head_never_takes_the_one_pass_kernel(monkeypatch):
    """p = e^(x - x_target) can pass fp16's 65504: fp16 logits go through the two-sweep kernel."""
    import dsk.models.ce_kernel as K
    import dsk.models.model as M

    called = []

    def two_sweeps(logits, targets, scale, ignore_index):
        called.append(logits.dtype)
        return torch.zeros(logits.shape[0]), torch.zeros_like(logits)

    def one_pass(*args):
        raise AssertionError("one-pass kernel on fp16 logits")

    monkeypatch.setattr(K, "available", lambda t: True)
    monkeypatch.setattr(K, "cross_entropy_rows", two_sweeps)
    monkeypatch.setattr(K, "cross_entropy_rows_onepass", one_pass)
    monkeypatch.setattr(M, "cross_entropy_onepass", True)
    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    M.head_cross_entropy(h.half(), w.half(), t, dtype=torch.float16)
    assert called == [torch.float16]
    with pytest.raises(AssertionError, match="one-pass"):  # bf16 does take it
        M.head_cross_entropy(h, w, t, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cross_entropy_kernel_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _head_loss_kernel_vs_torch("cuda")
    _head_loss_kernel_vs_torch("cuda", onepass=True)
