"""Unit tests of dsk.models: each block, masking, caches, routing, balancing, generation, I/O."""

from __future__ import annotations

import pytest
import torch

from dsk.errors import DskError
from dsk.models import Gate, ModelConfig, MoE, Transformer, load_model, sample_next, save_model

V = 97


def make(name="tiny", **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(name, vocab_size=V, **kw)).eval()


CONFIGS = {
    "mla-moe": dict(name="tiny"),
    "mla-qlora-sigmoid": dict(name="tiny", q_lora_rank=16, score_func="sigmoid", route_scale=2.0),
    "mha-gqa-dense": dict(name="tiny-dense"),
    "mha-moe-untied": dict(name="tiny-dense", n_dense_layers=1, n_routed_experts=4, n_shared_experts=2,
                           n_activated_experts=2, tie_embeddings=False),
}


@pytest.mark.parametrize("key", CONFIGS)
def test_forward_shapes_and_loss(key):
    model = make(**CONFIGS[key]).train()
    idx = torch.randint(0, V, (3, 11))
    out = model(idx, targets=idx)
    assert out.logits.shape == (3, 11, V)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate" not in n or "weight" in n)
    moe_layers = [i for i in range(model.cfg.n_layers) if model.cfg.is_moe_layer(i)]
    assert sorted(out.aux["expert_counts"]) == moe_layers
    for c in out.aux["expert_counts"].values():  # every token picks exactly k experts
        assert int(c.sum()) == 3 * 11 * model.cfg.n_activated_experts


@pytest.mark.parametrize("key", CONFIGS)
def test_causal_masking(key):
    model = make(**CONFIGS[key])
    idx = torch.randint(0, V, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % V
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the past never sees the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_mla_cache_stores_only_latent_and_rope_key():
    model = make("tiny")
    cfg = model.cfg
    cache = model.new_cache(batch_size=3, max_len=40)
    assert cache.numel() == cfg.n_layers * 3 * 40 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    mha = make("tiny-dense")
    mha_cache = mha.new_cache(batch_size=3, max_len=40)
    assert mha_cache.numel() == mha.cfg.n_layers * 3 * 40 * 2 * mha.cfg.kv_heads * mha.cfg.head_dim


@pytest.mark.parametrize("key", CONFIGS)
def test_cache_with_ragged_rows_matches_full_forward(key):
    """Rows of different lengths share one cached batch (continuous batching)."""
    model = make(**CONFIGS[key])
    row0, row1 = torch.randint(0, V, (9,)), torch.randint(0, V, (6,))
    cache = model.new_cache(batch_size=2, max_len=16)
    # prefill: row 1 is padded to row 0's 5 tokens; its padding is overwritten later
    pad = torch.full((2,), 3)
    model(torch.stack([row0[:5], torch.cat([row1[:3], pad])]), cache=cache, start_pos=torch.tensor([0, 0]))
    # next chunk: row 0 continues at 5, row 1 at 3, 3 tokens each
    got = model(torch.stack([row0[5:8], row1[3:6]]), cache=cache, start_pos=torch.tensor([5, 3])).logits
    ref0 = model(row0[None, :8]).logits[0, 5:8]
    ref1 = model(row1[None, :6]).logits[0, 3:6]
    torch.testing.assert_close(got[0], ref0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref1, atol=1e-5, rtol=1e-4)


def test_cache_beyond_its_length_is_an_error():
    model = make("tiny")
    cache = model.new_cache(batch_size=1, max_len=4)
    with pytest.raises(DskError):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, start_pos=torch.tensor([3]))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_topk_and_renormalisation(score_func):
    cfg = ModelConfig.preset("tiny", vocab_size=V, score_func=score_func, route_scale=1.5, n_routed_experts=6,
                             n_activated_experts=3)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    gate.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0]))  # expert 1 is always chosen
    x = torch.randn(50, cfg.dim)
    weights, ids, scores = gate(x)
    assert ids.shape == (50, 3) and weights.shape == (50, 3)
    assert (ids == 1).any(dim=1).all()
    expected_ids = torch.topk(scores + gate.bias, 3, dim=-1).indices
    assert torch.equal(ids, expected_ids)
    # weights come from the unbiased scores, renormalised over the k chosen, then scaled
    chosen = scores.gather(1, ids)
    torch.testing.assert_close(weights, 1.5 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), 1.5))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_update_moves_load_toward_balance(score_func):
    cfg = ModelConfig.preset("tiny", vocab_size=V, n_routed_experts=8, n_activated_experts=2, score_func=score_func)
    torch.manual_seed(0)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(std=0.1)
        gate.weight[0] += 0.1  # expert 0 is preferred by almost every token
    x = torch.randn(512, cfg.dim) + 0.5

    def load():
        return torch.bincount(gate(x)[1].flatten(), minlength=8).float()

    def imbalance(l):  # max load over mean load: 1.0 is perfect balance
        return float(l.max() / l.mean())

    before = imbalance(load())
    for _ in range(200):
        gate.update_bias(load(), speed=0.01)
    after = imbalance(load())
    assert before > 3.0
    assert after < 1.5


def test_model_update_router_bias_uses_recorded_load():
    model = make("tiny").train()
    idx = torch.randint(0, V, (4, 16))
    out = model(idx, targets=idx)
    moe = model.moe_layers()[1]
    torch.testing.assert_close(moe.load, out.aux["expert_counts"][1].float())
    loads = model.update_router_bias()
    assert torch.equal(loads[1], out.aux["expert_counts"][1].float())
    assert moe.load.sum() == 0
    assert moe.gate.bias.abs().sum() > 0  # moved (unless perfectly balanced)
    expected = 0.001 * torch.sign(loads[1].mean() - loads[1])
    torch.testing.assert_close(moe.gate.bias, expected)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_equals_naive_per_token_reference(score_func):
    cfg = ModelConfig.preset("tiny", vocab_size=V, n_routed_experts=5, n_activated_experts=2, n_shared_experts=1,
                             score_func=score_func, route_scale=1.3)
    torch.manual_seed(1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.bias.copy_(torch.randn(5) * 0.1)
    x = torch.randn(2, 7, cfg.dim)
    y, counts, _ = moe(x)

    flat = x.reshape(-1, cfg.dim)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # the slow obvious version
        logits = moe.gate.weight @ flat[t]
        s = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        top = torch.topk(s + moe.gate.bias, 2).indices
        w = s[top] / s[top].sum() * 1.3
        for wi, e in zip(w, top.tolist()):
            h = torch.nn.functional.silu(moe.experts.w1[e] @ flat[t]) * (moe.experts.w3[e] @ flat[t])
            ref[t] += wi * (moe.experts.w2[e] @ h)
        ref[t] += moe.shared_experts(flat[t])
    torch.testing.assert_close(y.reshape(-1, cfg.dim), ref, atol=1e-5, rtol=1e-4)
    assert int(counts.sum()) == 14 * 2


def test_sequence_balance_loss_is_added_and_trains_the_router():
    model = make("tiny", seq_aux_alpha=0.01).train()
    idx = torch.randint(0, V, (2, 16))
    out = model(idx, targets=idx)
    assert out.aux["balance_loss"] > 0
    torch.testing.assert_close(out.loss, out.aux["ce_loss"] + out.aux["balance_loss"])
    out.aux["balance_loss"].backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_same_gradients():
    idx = torch.randint(0, V, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = make("tiny").train()
        model.grad_checkpointing = ckpt
        model(idx, targets=idx).loss.backward()
        grads.append(model.embed.weight.grad.clone())
        assert model.layers[1].ffn.load.sum() == 2 * 12 * 2  # counted once, not again on recompute
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("key", ["mla-moe", "mha-gqa-dense"])
def test_generate_same_tokens_with_and_without_cache(key):
    model = make(**CONFIGS[key])
    prompt = torch.randint(0, V, (2, 5))
    greedy = [model.generate(prompt, 20, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = []
    for c in (True, False):
        g = torch.Generator().manual_seed(7)
        sampled.append(model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, use_cache=c, generator=g))
    assert torch.equal(sampled[0], sampled[1])
    assert sampled[0].shape == (2, 25) and torch.equal(sampled[0][:, :5], prompt)


def test_sample_next_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) <= {0, 1}
    # p(0) ~ 0.70, p(0)+p(1) ~ 0.96: top_p=0.9 keeps exactly the first two
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=0).tolist()) == {0}


def test_save_load_roundtrip(tmp_path):
    for key in ("mla-moe", "mha-moe-untied"):
        model = make(**CONFIGS[key])
        model.layers[1].ffn.gate.bias.fill_(0.25) if key == "mla-moe" else None
        save_model(model, tmp_path / key)
        loaded, tok, cfg = load_model(tmp_path / key)
        assert tok is None and cfg == model.cfg
        idx = torch.randint(0, V, (2, 9))
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_config_errors_are_one_line():
    with pytest.raises(DskError, match="does not divide dim"):
        ModelConfig.preset("tiny", vocab_size=V, n_heads=5)
    with pytest.raises(DskError, match="n_kv_heads"):
        ModelConfig.preset("tiny-dense", vocab_size=V, n_kv_heads=3)
    with pytest.raises(DskError, match="unknown model preset"):
        ModelConfig.preset("huge")
    with pytest.raises(DskError, match="n_activated_experts"):
        ModelConfig.preset("tiny", n_activated_experts=9)
