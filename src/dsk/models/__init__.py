"""dsk's models: a DeepSeek-style transformer (MHA/GQA or MLA attention, SwiGLU, DeepSeekMoE).

    >>> from dsk.models import ModelConfig, Transformer, load_model
    >>> cfg = ModelConfig.preset("tiny", vocab_size=512)
    >>> model = Transformer(cfg)
    >>> out = model(idx, targets=targets)              # .logits, .loss, .aux
    >>> cache = model.new_cache(batch_size=2, max_len=128)
    >>> out = model(idx, cache=cache, start_pos=pos)   # pos: LongTensor[B]
    >>> model, tokenizer, cfg = load_model(".dsk/artifacts/pretrain/<id>")

Importing this package imports torch.
"""

from dsk.models.config import PRESETS, ModelConfig
from dsk.models.io import config_json, load_model, load_state, save_model, state_dict_for_save
from dsk.models.model import (
    MLA,
    MLP,
    Attention,
    Block,
    Gate,
    KVCache,
    ModelOutput,
    MoE,
    RMSNorm,
    Transformer,
    sample_next,
)

__all__ = [
    "PRESETS", "ModelConfig", "Transformer", "ModelOutput", "KVCache", "Block", "Attention", "MLA",
    "MLP", "MoE", "Gate", "RMSNorm", "sample_next", "load_model", "save_model", "load_state",
    "config_json", "state_dict_for_save",
]
