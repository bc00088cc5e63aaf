"""`dsk eval`: language-model metrics match a hand computation; variants compare side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE

TINY_PRETRAIN = ["--max-steps", "8", "--batch-size", "4", "--context", "32", "--eval-every", "8", "--log-every", "4",
                 "--warmup-steps", "2", "--eval-tokens", "2048", "--threads", "1"]


@pytest.fixture
def lm_lineage(cli, tmp_path):
    """raw text → clean → featurize → pretrain (tiny, real stages)."""
    (tmp_path / "corpus.txt").write_text((SAMPLE / "tinyshakespeare.txt").read_text()[:60_000])
    assert cli("clean", tmp_path / "corpus.txt", "--min-words", "1", "--quiet")[0] == 0
    assert cli("featurize", "--vocab-size", "300", "--val-fraction", "0.1", "--quiet")[0] == 0
    code, out, err = cli("pretrain", *TINY_PRETRAIN, "--json")
    assert code == 0, err
    return json.loads(out)


def test_eval_matches_hand_computed_bits_per_byte(cli, lm_lineage, workspace):
    from dsk.artifacts import Store
    from dsk.models import load_model

    code, out, err = cli("eval", "--max-batches", "3", "--prompts", '["ROMEO:"]', "--max-new-tokens", "5", "--json")
    assert code == 0, err
    summary = json.loads(out)
    path = Path(summary["path"])
    assert sorted(p.name for p in path.iterdir()) == ["log.txt", "manifest.json", "samples.jsonl"]
    metrics = summary["metrics"]

    # by hand: the same non-overlapping windows, log-softmax, and the split's token/byte ratio
    store = Store.open()
    tokens = store.latest("featurize")
    meta = json.loads((tokens.path / "meta.json").read_text())
    val = np.fromfile(tokens.path / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    model, _, cfg = load_model(store.latest("pretrain").path)
    seq = min(256, cfg.max_seq_len)
    windows = [val[i * seq: i * seq + seq + 1] for i in range((len(val) - 1) // seq)][: 3 * 8]
    nats, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor(w[None, :-1])
            logp = torch.log_softmax(model(x).logits.float(), dim=-1)[0]
            nats -= float(logp[torch.arange(seq), torch.tensor(w[1:])].sum())
            count += seq
    loss = nats / count
    bpb = loss * meta["n_val_tokens"] / (math.log(2) * meta["val_bytes"])
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics["bpb"] == pytest.approx(bpb, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    samples = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["ROMEO:"] and samples[0]["tokens"] <= 5
    # the eval artifact sits in the model's lineage
    assert json.loads((path / "manifest.json").read_text())["inputs"][0]["id"] == lm_lineage["id"]
    assert cli("eval", "--max-batches", "3", "--prompts", '["ROMEO:"]', "--max-new-tokens", "5", "--json")[1].count('"cached": true') == 1


def test_eval_compare_quantized_and_onnx(cli, lm_lineage, capsys):
    assert cli("quantize", "--bits", "8", "--eval-batches", "2", "--bench-tokens", "4", "--quiet")[0] == 0
    assert cli("export", "--from", lm_lineage["id"], "--format", "onnx", "--verify-prompts", "1",
               "--bench-tokens", "4", "--quiet")[0] == 0
    code, out, err = cli("eval", "--compare", "pretrain:latest", "--compare", "quantize:latest",
                         "--compare", "export:latest", "--max-batches", "2", "--prompts", "[]")
    assert code == 0, err
    text = out + err
    for label in ("pretrain:", "quantize:", "export:", "bpb", "perplexity"):
        assert label in text
    from dsk.artifacts import Store

    evals = list(Store.open().iter_artifacts("eval"))
    assert len(evals) == 3
    bpb = {e.input_ids[0]: e.metrics["bpb"] for e in evals}
    values = list(bpb.values())
    # int8 and an fp32 ONNX graph stay close to the float model
    assert max(values) - min(values) < 0.05 * min(values)


def test_eval_rejects_non_models(cli, tmp_path):
    (tmp_path / "c.txt").write_text("Some words here.\n\nAnd more words there.\n")
    code, out, _ = cli("clean", tmp_path / "c.txt", "--min-words", "1", "--json")
    code, _, err = cli("eval", json.loads(out)["id"])
    assert code == 2 and "not a model" in err
