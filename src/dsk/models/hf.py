"""Write a dsk Transformer as a Hugging Face checkpoint that `transformers` loads without custom code.

* dense MHA/GQA models (``attn="mha"``, no MoE layers) -> ``LlamaForCausalLM``;
* MLA models with DeepSeek-V3's router (``score_func="sigmoid"``) -> ``DeepseekV3ForCausalLM``
  (presets ``tiny-v3``/``small-v3`` are made for this mapping).

The mapping is a renaming of tensors plus a config translation; this module does not import
`transformers` (it is only a test dependency). Facts it relies on, checked by the tests
against the installed transformers: both use rotate-half RoPE when ``rope_interleave`` is false;
DeepSeek-V3's router is sigmoid scores + ``e_score_correction_bias`` for the choice only,
renormalised top-k weights (``norm_topk_prob``) times ``routed_scaling_factor``; with
``n_group = topk_group = 1`` group-limited routing is the plain top-k dsk uses; the first
``first_k_dense_replace`` layers are dense; shared experts are one SwiGLU of width
``n_shared_experts * moe_intermediate_size``; MLA's inner norms (``q_a_layernorm``,
``kv_a_layernorm``) use eps 1e-6, so dsk's ``norm_eps`` must be 1e-6 for an exact match.

    >>> from dsk.models.hf import save_hf
    >>> info = save_hf(model, "out/", tokenizer_path="model_dir/tokenizer.json")
    >>> # AutoModelForCausalLM.from_pretrained("out/")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from dsk.errors import DskError
from dsk.models.config import ModelConfig

HF_MLA_EPS = 1e-6  # transformers' DeepseekV3 q_a_layernorm / kv_a_layernorm eps (not configurable)


def hf_architecture(cfg: ModelConfig) -> str:
    """Which transformers class can hold ``cfg`` exactly, or a DskError naming the choices."""
    extras = [name for name, on in (("qk_norm", cfg.qk_norm), ("mlp_act: relu2", cfg.mlp_act != "swiglu"),
                                    ("logit_softcap", cfg.logit_softcap > 0)) if on]
    if extras:
        raise DskError(f"this model uses {', '.join(extras)}, which Llama/DeepseekV3 do not have; "
                       "use --format safetensors (or onnx, which has ReLU^2 but not QK-norm or soft-capping)")
    if cfg.attn == "mha":
        if cfg.is_moe:
            raise DskError(
                "an MHA model with MoE layers has no exact Hugging Face architecture; hf export supports "
                "dense MHA (LlamaForCausalLM) or MLA+MoE with a sigmoid router (DeepseekV3ForCausalLM, presets "
                "tiny-v3/small-v3); use --format onnx or safetensors"
            )
        return "LlamaForCausalLM"
    if cfg.is_moe and cfg.score_func != "sigmoid":
        raise DskError(
            f"this MLA+MoE model routes with {cfg.score_func!r} scores, DeepseekV3ForCausalLM with sigmoid; "
            "train with a DeepSeek-V3-exact preset (tiny-v3, small-v3) for --format hf, or use --format onnx|safetensors"
        )
    if cfg.is_moe and cfg.n_shared_experts < 1:
        raise DskError("DeepseekV3ForCausalLM always has a shared expert; this model has none; use --format onnx|safetensors")
    return "DeepseekV3ForCausalLM"


def _special_ids(tokenizer_path: Path | None) -> dict[str, int]:
    if tokenizer_path is None or not tokenizer_path.is_file():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id("<|endoftext|>")
    return {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}


def hf_config(cfg: ModelConfig, special: dict[str, int]) -> dict[str, Any]:
    arch = hf_architecture(cfg)
    common = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
        "pad_token_id": None,
    }
    if arch == "LlamaForCausalLM":
        return {**common, "model_type": "llama", "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "mlp_bias": False, "pretraining_tp": 1}
    moe = cfg.is_moe
    return {
        **common,
        "model_type": "deepseek_v3",
        "num_key_value_heads": cfg.n_heads,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "n_shared_experts": cfg.n_shared_experts if moe else 1,
        "n_routed_experts": cfg.n_routed_experts if moe else 2,
        "num_experts_per_tok": cfg.n_activated_experts if moe else 1,
        "routed_scaling_factor": cfg.route_scale,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "first_k_dense_replace": cfg.n_dense_layers if moe else cfg.n_layers,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_interleave": False,  # dsk uses the rotate-half layout
        "num_nextn_predict_layers": 0,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    }


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """dsk tensor names -> transformers names (per-expert keys, as DeepSeek's checkpoints have)."""
    from dsk.models.model import MLA, MoE

    cfg = model.cfg
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        a = block.attn
        if isinstance(a, MLA):
            if hasattr(a, "wq_a"):
                out[p + "self_attn.q_a_proj.weight"] = a.wq_a.weight
                out[p + "self_attn.q_a_layernorm.weight"] = a.q_norm.weight
                out[p + "self_attn.q_b_proj.weight"] = a.wq_b.weight
            else:
                out[p + "self_attn.q_proj.weight"] = a.wq.weight
            out[p + "self_attn.kv_a_proj_with_mqa.weight"] = a.wkv_a.weight
            out[p + "self_attn.kv_a_layernorm.weight"] = a.kv_norm.weight
            out[p + "self_attn.kv_b_proj.weight"] = a.wkv_b.weight
        else:
            out[p + "self_attn.q_proj.weight"] = a.wq.weight
            out[p + "self_attn.k_proj.weight"] = a.wk.weight
            out[p + "self_attn.v_proj.weight"] = a.wv.weight
        out[p + "self_attn.o_proj.weight"] = a.wo.weight
        f = block.ffn
        if isinstance(f, MoE):
            out[p + "mlp.gate.weight"] = f.gate.weight
            out[p + "mlp.gate.e_score_correction_bias"] = f.gate.bias
            for e in range(cfg.n_routed_experts):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = f.experts.w1[e]
                out[p + f"mlp.experts.{e}.up_proj.weight"] = f.experts.w3[e]
                out[p + f"mlp.experts.{e}.down_proj.weight"] = f.experts.w2[e]
            s = f.shared_experts
            out[p + "mlp.shared_experts.gate_proj.weight"] = s.w1.weight
            out[p + "mlp.shared_experts.up_proj.weight"] = s.w3.weight
            out[p + "mlp.shared_experts.down_proj.weight"] = s.w2.weight
        else:
            out[p + "mlp.gate_proj.weight"] = f.w1.weight
            out[p + "mlp.up_proj.weight"] = f.w3.weight
            out[p + "mlp.down_proj.weight"] = f.w2.weight
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def save_hf(model: torch.nn.Module, out_dir: str | Path, *, tokenizer_path: str | Path | None = None) -> dict[str, Any]:
    """Write config.json, model.safetensors, generation_config.json (+ tokenizer.json)."""
    from safetensors.torch import save_file

    if getattr(model, "quant_config", None) is not None:
        raise DskError("hf export needs a float model; export the unquantized parent (or use --format safetensors)")
    cfg = model.cfg
    tok = Path(tokenizer_path) if tokenizer_path else None
    special = _special_ids(tok)
    config = hf_config(cfg, special)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special.get("eos_token_id"),
                  "max_length": cfg.max_seq_len, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tok is not None and tok.is_file():
        shutil.copyfile(tok, out / "tokenizer.json")
    exact = not (cfg.attn == "mla" and abs(cfg.norm_eps - HF_MLA_EPS) > 1e-12)
    return {"architecture": config["architectures"][0], "exact_mapping": exact}


def compare_with_transformers(model: torch.nn.Module, hf_dir: str | Path, *, seed: int = 0) -> float | None:
    """Max |logit diff| between dsk and transformers on a random prompt; None without transformers."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((hf(ids).logits - model(ids).logits).abs().max())
