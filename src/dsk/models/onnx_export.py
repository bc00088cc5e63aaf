"""Export a dsk Transformer to one ONNX decoder graph with past key/values inputs and outputs.

The graph maps ``input_ids [B, T]`` and the cache of every layer (``past.<i>.k``/``past.<i>.v``
for MHA, ``past.<i>.kv``/``past.<i>.k_rope`` for MLA: the compressed latent and the shared rotary
key, sequence on axis 1) to ``logits [B, T, V]`` and the grown cache ``present.<i>.*``. Batch,
sequence and past-sequence axes are dynamic, so prefill (past of length 0) and each decode step
run through the same graph. All rows of a batch share one past length.

    >>> from dsk.models.onnx_export import export_onnx
    >>> layout = export_onnx(model, "out/model.onnx")
    >>> # then: dsk.models.onnx_runtime.OnnxLM("out/")

The graph is traced from :class:`ExportDecoder`, a forward written for tracing with the same
weights: the KV cache grows by concatenation instead of per-row writes, and the MoE runs every
routed expert as one wide matmul weighted by a dense (mostly zero) routing matrix. That is the
same function as the sparse dispatch (non-chosen experts get weight 0) without data-dependent
control flow, and it keeps every weight a constant that onnxruntime's int8 quantizer can find.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.errors import DskError
from dsk.models.model import MLA, MoE, Transformer

OPSET = 17


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # written out: the legacy exporter has no aten::rms_norm symbolic
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)) * norm.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _attend(q, k, v, mask_bias, scale):
    """q [B,H,T,D], k/v [B,H,S,D], additive mask [T,S] -> [B,T,H*Dv]."""
    att = torch.matmul(q, k.transpose(-1, -2)) * scale + mask_bias
    y = torch.matmul(att.softmax(dim=-1), v)
    B, H, T, Dv = y.shape
    return y.transpose(1, 2).reshape(B, T, H * Dv)


class ExportDecoder(nn.Module):
    """``(input_ids, *past) -> (logits, *present)`` over a dsk Transformer's weights (see module doc)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        for i, block in enumerate(model.layers):
            if isinstance(block.ffn, MoE):
                e = block.ffn.experts
                n, inter, dim = e.w1.shape
                # all experts side by side, laid out for `x @ W` so each exports as a MatMul with a
                # constant right operand (a Gemm would be skipped by onnxruntime's dynamic quantizer)
                # (persistent buffers become initializers; non-persistent ones would be inlined as
                # Constant nodes, which onnxruntime's quantizer does not look at)
                self.register_buffer(f"moe{i}_w1", e.w1.detach().reshape(n * inter, dim).t().contiguous())
                self.register_buffer(f"moe{i}_w3", e.w3.detach().reshape(n * inter, dim).t().contiguous())
                self.register_buffer(f"moe{i}_w2", e.w2.detach().permute(0, 2, 1).reshape(n * inter, dim))

    def past_names(self) -> list[str]:
        kinds = ("kv", "k_rope") if self.cfg.attn == "mla" else ("k", "v")
        return [f"past.{i}.{k}" for i in range(self.cfg.n_layers) for k in kinds]

    def past_shapes(self) -> list[list[int]]:
        """Per past input, the trailing (fixed) dims after [batch, seq]."""
        c = self.cfg
        one = [[c.kv_lora_rank], [c.qk_rope_head_dim]] if c.attn == "mla" else [[c.kv_heads, c.head_dim]] * 2
        return one * c.n_layers

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        m, cfg = self.model, self.cfg
        T = input_ids.shape[1]
        past_len = past[0].shape[1]
        positions = torch.arange(T, device=input_ids.device) + past_len  # [T]
        keys = torch.arange(T + past_len, device=input_ids.device)
        mask_bias = torch.where(keys[None, :] <= positions[:, None], 0.0, float("-inf"))  # [T, S]
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]  # [T, d/2]
        h = m.embed(input_ids)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(m.layers):
            x = _rms(block.attn_norm, h)
            if isinstance(block.attn, MLA):
                a, pres = self._mla(block.attn, x, cos, sin, past[2 * i], past[2 * i + 1], mask_bias)
            else:
                a, pres = self._mha(block.attn, x, cos, sin, past[2 * i], past[2 * i + 1], mask_bias)
            presents.extend(pres)
            h = h + a
            x = _rms(block.ffn_norm, h)
            h = h + (self._moe(i, block.ffn, x) if isinstance(block.ffn, MoE) else block.ffn(x))
        logits = m.head(_rms(m.norm, h))
        return (logits, *presents)

    def _mha(self, attn, x, cos, sin, past_k, past_v, mask_bias):
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, attn.n_heads, attn.hd).transpose(1, 2)
        k = attn.wk(x).view(B, T, attn.n_kv, attn.hd)
        v = attn.wv(x).view(B, T, attn.n_kv, attn.hd)
        q = _rope(q, cos, sin)
        k = _rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
        k_all = torch.cat([past_k, k], dim=1)  # [B, S, n_kv, hd]
        v_all = torch.cat([past_v, v], dim=1)
        kk, vv = k_all.transpose(1, 2), v_all.transpose(1, 2)
        if attn.n_kv != attn.n_heads:
            kk = kk.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
            vv = vv.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        y = _attend(q, kk, vv, mask_bias, attn.hd**-0.5)
        return attn.wo(y), (k_all, v_all)

    def _mla(self, attn, x, cos, sin, past_kv, past_kr, mask_bias):
        B, T, _ = x.shape
        H = attn.n_heads
        q = attn.wq_b(_rms(attn.q_norm, attn.wq_a(x))) if hasattr(attn, "wq_a") else attn.wq(x)
        q = q.view(B, T, H, attn.nope + attn.rope).transpose(1, 2)
        q_nope, q_rope = q[..., : attn.nope], q[..., attn.nope :]
        q_rope = _rope(q_rope, cos, sin)
        kv_a = attn.wkv_a(x)
        kv, k_rope = kv_a[..., : attn.kv_lora_rank], kv_a[..., attn.kv_lora_rank :]
        kv = _rms(attn.kv_norm, kv)
        k_rope = _rope(k_rope, cos, sin)
        kv_all = torch.cat([past_kv, kv], dim=1)  # [B, S, r]
        kr_all = torch.cat([past_kr, k_rope], dim=1)  # [B, S, rope]
        S = kv_all.shape[1]
        kvx = attn.wkv_b(kv_all).view(B, S, H, attn.nope + attn.vd).transpose(1, 2)
        k_nope, v = kvx[..., : attn.nope], kvx[..., attn.nope :]
        k = torch.cat([k_nope, kr_all.unsqueeze(1).expand(B, H, S, attn.rope)], dim=-1)
        y = _attend(torch.cat([q_nope, q_rope], dim=-1), k, v, mask_bias, attn.scale)
        return attn.wo(y), (kv_all, kr_all)

    def _moe(self, i: int, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        gate = moe.gate
        logits = F.linear(flat, gate.weight)
        scores = logits.softmax(dim=-1) if gate.score_func == "softmax" else logits.sigmoid()
        ids = torch.topk(scores + gate.bias, gate.topk, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(dim=-1, keepdim=True) * gate.route_scale
        dense_w = torch.zeros_like(scores).scatter(1, ids, w)  # [N, E], zero for unchosen experts
        E = scores.shape[-1]
        w1, w3, w2 = getattr(self, f"moe{i}_w1"), getattr(self, f"moe{i}_w3"), getattr(self, f"moe{i}_w2")
        # 3-D activations throughout, so every projection is a MatMul (see __init__)
        hid = F.silu(torch.matmul(x, w1)) * torch.matmul(x, w3)  # [B, T, E*I]
        hid = (hid.view(B, T, E, -1) * dense_w.view(B, T, E, 1)).reshape(B, T, -1)
        y = torch.matmul(hid, w2)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x)
        return y


def export_onnx(model: Transformer, path: str | Path, *, opset: int = OPSET) -> dict[str, Any]:
    """Write the decoder graph to ``path``; returns its layout (also what ``onnx.json`` holds)."""
    if getattr(model, "quant_config", None) is not None:
        raise DskError(
            "cannot export a torch-quantized model to ONNX; export the float model and use "
            "`dsk quantize --bits 8 --backend onnx` for an int8 graph"
        )
    # the hand-written decoder graph below has no QK-norm or logit soft-capping (CPU-recipe
    # options, off by default): refuse rather than export a graph that computes something else
    extras = [name for name, on in (("qk_norm", model.cfg.qk_norm), ("logit_softcap", model.cfg.logit_softcap > 0)) if on]
    if extras:
        raise DskError(f"this model uses {', '.join(extras)}, which the ONNX decoder does not implement; "
                       "use --format safetensors")
    import warnings

    model = model.float().eval()
    wrapper = ExportDecoder(model).eval()
    names, shapes = wrapper.past_names(), wrapper.past_shapes()
    out_names = ["logits"] + [n.replace("past.", "present.") for n in names]
    B, T, S = 2, 3, 4  # dummy sizes, all marked dynamic below
    dummy_ids = torch.zeros(B, T, dtype=torch.long)
    dummy_past = tuple(torch.zeros(B, S, *s) for s in shapes)
    dynamic_axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for n in names:
        dynamic_axes[n] = {0: "batch", 1: "past_seq"}
        dynamic_axes[n.replace("past.", "present.")] = {0: "batch", 1: "total_seq"}
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy_ids, *dummy_past), str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", *names], output_names=out_names, dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return {
        "format": "dsk-onnx-decoder",
        "version": 1,
        "opset": opset,
        "inputs": ["input_ids", *names],
        "outputs": out_names,
        "past_inputs": names,
        "past_shapes": shapes,
        "seq_axis": 1,
        "vocab_size": model.cfg.vocab_size,
        "max_seq_len": model.cfg.max_seq_len,
        "quantization": None,
    }


def write_layout(layout: dict[str, Any], directory: str | Path) -> None:
    (Path(directory) / "onnx.json").write_text(json.dumps(layout, indent=2, sort_keys=True) + "\n")


def verify_onnx(model: Transformer, directory: str | Path, *, seed: int = 0, n_prompts: int = 3,
                prompt_len: int = 12, new_tokens: int = 32) -> dict[str, Any]:
    """Max |logit diff| vs torch on random prompts (full graph and step by step), and whether
    ``new_tokens`` greedy tokens generated with the ONNX KV cache equal torch's."""
    from dsk.models.onnx_runtime import OnnxLM

    lm = OnnxLM(directory)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    new_tokens = max(1, min(new_tokens, cfg.max_seq_len - prompt_len))
    max_diff, step_diff, identical = 0.0, 0.0, True
    model.eval()
    with torch.no_grad():
        for _ in range(n_prompts):
            ids = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=gen)
            ref = model(ids).logits
            got = torch.from_numpy(lm.forward(ids.numpy())[0])
            max_diff = max(max_diff, float((ref - got).abs().max()))
            want = model.generate(ids[:1], new_tokens, temperature=0.0)
            have, logits_seen = lm.generate(ids[:1].numpy(), new_tokens, return_logits=True)
            identical &= bool((torch.from_numpy(have) == want).all())
            # the cached ONNX steps against torch on the same (torch-generated) sequence
            full = model(want[:, :-1]).logits[0, prompt_len - 1 :]
            step_diff = max(step_diff, float((full - torch.from_numpy(logits_seen)).abs().max()))
    return {"max_abs_logit_diff": max_diff, "max_abs_logit_diff_cached": step_diff,
            "greedy_tokens_identical": identical, "greedy_tokens": new_tokens, "prompts": n_prompts}
