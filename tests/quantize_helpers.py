"""Fixtures for the quantize/export tests: a byte-level `tokens` artifact and small trained models.

Until `dsk featurize`/`dsk pretrain` are merged these stand in for them, written through
``run_stage`` so lineage, manifests and caching are the real thing. The model is trained for a
few dozen steps on the sample text so that perplexities mean something (a random model's
perplexity is ~vocab and hides quantization error).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from dsk.config import StageParams
from dsk.runtime import run_stage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "tinyshakespeare.txt"


class TokensParams(StageParams):
    n_bytes: int = Field(60_000)


class ModelParams(StageParams):
    preset: str = Field("tiny")
    steps: int = Field(40)
    overrides: dict = Field(default_factory=dict)


def build_tokens(ctx) -> None:
    """Bytes as token ids (vocab 256): val = the last 20%."""
    data = np.frombuffer(SAMPLE.read_bytes()[: ctx.params.n_bytes], dtype=np.uint8).astype(np.uint16)
    split = int(len(data) * 0.8)
    data[:split].tofile(ctx.out / "train.bin")
    data[split:].tofile(ctx.out / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": 256, "special_tokens": {}, "n_train_tokens": split,
            "n_val_tokens": len(data) - split, "train_bytes": split, "val_bytes": len(data) - split}
    (ctx.out / "meta.json").write_text(json.dumps(meta))
    ctx.kind = "tokens"


def build_model(ctx) -> None:
    import torch

    from dsk.models import ModelConfig, Transformer, save_model

    torch.manual_seed(0)
    cfg = ModelConfig.preset(ctx.params.preset, vocab_size=256, max_seq_len=128, **ctx.params.overrides)
    model = Transformer(cfg)
    train = np.fromfile(ctx.input.path / "train.bin", dtype=np.uint16).astype(np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = np.random.default_rng(0)
    for _ in range(ctx.params.steps):
        starts = gen.integers(0, len(train) - 65, size=8)
        batch = torch.from_numpy(np.stack([train[s : s + 65] for s in starts]))
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias()
    save_model(model.eval(), ctx.out)
    ctx.kind = "model"
    ctx.metrics = {"final_loss": float(loss.detach())}


def make_tokens(store, n_bytes: int = 60_000):
    return run_stage(stage="featurize", params=TokensParams(n_bytes=n_bytes), inputs=[],
                     build="quantize_helpers:build_tokens", store=store).artifact


def make_model(store, tokens, preset: str = "tiny", steps: int = 40, **overrides):
    return run_stage(stage="pretrain", params=ModelParams(preset=preset, steps=steps, overrides=overrides),
                     inputs=[tokens], build="quantize_helpers:build_model", store=store).artifact


def build_model_without_data(ctx) -> None:
    """An untrained model artifact with no tokens artifact in its lineage."""
    import torch

    from dsk.models import ModelConfig, Transformer, save_model

    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset(ctx.params.preset, vocab_size=256, max_seq_len=128)), ctx.out)
    ctx.kind = "model"


# ---- fixtures shared by test_quantize.py and test_export.py (import them by name)

import pytest  # noqa: E402
import torch  # noqa: E402

from dsk.artifacts import Store  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: one thread is faster than two contending
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokens artifact and a tiny MLA+MoE model trained briefly on the sample text (shared)."""
    store = Store.open(tmp_path_factory.mktemp("dskhome"))
    tokens = make_tokens(store, 30_000)
    model = make_model(store, tokens, steps=15)
    return store, tokens, model


@pytest.fixture
def shared_cli(cli, trained, monkeypatch):
    store, _, _ = trained
    monkeypatch.setenv("DSK_HOME", str(store.root))
    return cli
