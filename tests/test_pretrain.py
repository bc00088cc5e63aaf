"""`dsk pretrain` end to end (tiny CPU runs), resume bit-identity, error paths, and the trainer's parts."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pretrain_helpers import SAMPLE, make_tokens_artifact

TINY = ["--max-steps", "10", "--batch-size", "4", "--context", "32", "--eval-every", "5", "--log-every", "2",
        "--warmup-steps", "2", "--eval-tokens", "2048", "--threads", "1"]
ARTIFACT_FILES = ["config.json", "curves.png", "log.txt", "manifest.json", "metrics.jsonl", "model.safetensors",
                  "timing.jsonl", "tokenizer.json"]


def tiny_params(**kw):
    from dsk.pretrain import Params

    base = dict(max_steps=10, batch_size=4, context=32, eval_every=5, log_every=2, warmup_steps=2, eval_tokens=2048,
                threads=1)  # one thread: on a busy 2-core machine two threads mostly wait on each other
    return Params(**{**base, **kw})


# ------------------------------------------------------------------ end to end


def test_pretrain_10_steps_writes_model_artifact(cli, workspace):
    from dsk.models import load_model

    make_tokens_artifact()
    code, out, err = cli("pretrain", *TINY, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["kind"] == "model" and not summary["cached"]
    path = workspace / "artifacts" / "pretrain" / summary["id"]
    assert sorted(p.name for p in path.iterdir()) == ARTIFACT_FILES
    m = summary["metrics"]
    assert m["steps"] == 10 and m["tokens"] == 10 * 4 * 32
    assert math.isfinite(m["val_bpb"]) and m["val_bpb"] > 0
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in records if r["split"] == "val"] == [5, 10]
    assert all("max_vio" in r and "expert_load" in r for r in records if r["split"] == "train")  # tiny is MoE
    assert records[-1]["bpb"] == pytest.approx(m["val_bpb"])
    model, tokenizer, cfg = load_model(path)
    assert cfg.vocab_size == tokenizer.vocab_size and cfg.max_seq_len == 32
    prompt = tokenizer.encode("ROMEO:")
    ids = model.generate(torch.tensor([prompt]), 8, temperature=0)
    assert ids.shape[1] == len(prompt) + 8 and isinstance(tokenizer.decode(ids[0].tolist()), str)
    # no run directory is left behind once the artifact exists
    assert not (workspace / "runs" / "pretrain" / summary["id"]).exists()

    code, out, _ = cli("pretrain", *TINY, "--json")
    assert code == 0 and json.loads(out)["cached"] is True


def test_pretrain_on_real_featurize_output(cli, workspace):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dsk.config import StageParams
    from dsk.runtime import run_stage

    docs = [p for p in SAMPLE.read_text()[:40_000].split("\n\n") if p.strip()]

    def build(ctx):  # a clean-like text artifact in the documented layout
        pq.write_table(pa.table({"doc_id": pa.array(range(len(docs)), pa.int64()), "text": docs,
                                 "source": ["sample"] * len(docs), "line": pa.array([0] * len(docs), pa.int64())}),
                       ctx.out / "documents.parquet")
        ctx.kind = "text"

    run_stage(stage="clean", params=StageParams(), inputs=[], build=build, kind="text")
    code, _, err = cli("featurize", "--vocab-size", "300", "--val-fraction", "0.1")
    assert code == 0, err
    code, out, err = cli("pretrain", *TINY, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["steps"] == 10


def test_train_alias_and_profile(cli, workspace):
    make_tokens_artifact()
    code, out, err = cli("train", "--stage", "pretrain", *TINY, "--profile", "2", "--preset", "tiny-dense", "--json")
    assert code == 0, err
    summary = json.loads(out)
    path = workspace / "artifacts" / "pretrain" / summary["id"]
    assert (path / "profile_trace.json").is_file()
    assert "Name" in (path / "profile_ops.txt").read_text()
    json.loads((path / "profile_trace.json").read_text())  # a valid Chrome trace


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(workspace, precision):
    from dsk.pretrain import run

    make_tokens_artifact()
    result = run(params=tiny_params(precision=precision, max_steps=4, eval_every=0))
    assert math.isfinite(result.artifact.metrics["val_loss"])
    records = [json.loads(x) for x in (result.artifact.path / "metrics.jsonl").read_text().splitlines()]
    if precision == "fp16":
        assert records[0]["loss_scale"] == 2.0**15


def test_same_seed_same_weights_bytes(workspace):
    from dsk.pretrain import run

    make_tokens_artifact()
    first = run(params=tiny_params(max_steps=4)).artifact
    data = (first.path / "model.safetensors").read_bytes()
    metrics = (first.path / "metrics.jsonl").read_bytes()
    again = run(params=tiny_params(max_steps=4), force=True).artifact
    assert (again.path / "model.safetensors").read_bytes() == data
    assert (again.path / "metrics.jsonl").read_bytes() == metrics


# ------------------------------------------------------------------ resume


def test_resume_after_a_kill_is_bit_identical(workspace, monkeypatch):
    from dsk.pretrain import run
    from dsk.train.data import TokenData

    make_tokens_artifact()
    params = tiny_params(max_steps=12, checkpoint_every=4, preset="tiny")
    # kill the run while it prepares step 10 (checkpoints exist at steps 4 and 8)
    real_batch = TokenData.batch

    def dying_batch(self, step, micro=0):
        if step == 9:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, step, micro)

    monkeypatch.setattr(TokenData, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        run(params=params)
    assert not (workspace / "artifacts" / "pretrain").exists() or not any((workspace / "artifacts" / "pretrain").iterdir())
    runs = list((workspace / "runs" / "pretrain").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000008"]
    monkeypatch.setattr(TokenData, "batch", real_batch)

    resumed = run(params=params, resume=True).artifact
    assert resumed.metrics["resumed_from_step"] == 8
    resumed_bytes = (resumed.path / "model.safetensors").read_bytes()
    resumed_metrics = (resumed.path / "metrics.jsonl").read_text()

    fresh = run(params=params, force=True).artifact  # uninterrupted, same settings
    assert fresh.metrics["resumed_from_step"] == 0
    assert (fresh.path / "model.safetensors").read_bytes() == resumed_bytes
    assert (fresh.path / "metrics.jsonl").read_text() == resumed_metrics


def test_resume_refuses_a_checkpoint_of_another_config(cli, workspace):
    from dsk.pretrain import run
    from dsk.pretrain.stage import run_dir_for
    from dsk.artifacts import Store

    make_tokens_artifact()
    # a run of another config leaves a checkpoint; put it where this config's run would look
    other = tiny_params(max_steps=8, checkpoint_every=4, arch={"dim": 32})
    from dsk.train import TokenData, TrainConfig, train
    from dsk.models import Transformer
    from dsk.pretrain.stage import model_config

    store = Store.open()
    src = store.latest("featurize")
    data = TokenData.open(src.path, context=32, batch_size=4, seed=0)
    scratch = workspace / "scratch"
    train(Transformer(model_config(other, data.vocab_size)), data, TrainConfig(max_steps=4, checkpoint_every=2),
          run_dir=scratch, run_fingerprint={"other": True})
    mine = ["--max-steps", "8", "--batch-size", "4", "--context", "32", "--checkpoint-every", "4", "--threads", "1",
            "--eval-tokens", "1024"]
    # learn this config's artifact id from a --json run, then plant the foreign checkpoint
    code, out, _ = cli("pretrain", *mine, "--json")
    artifact_id = json.loads(out)["id"]
    target = run_dir_for(store, artifact_id) / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(scratch / "checkpoints" / "step-00000002", target / "step-00000002")
    code, out, err = cli("pretrain", *mine, "--resume", "--force")
    assert code == 2
    assert "another config" in err and "dim=32" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")  # one line, no traceback


# ------------------------------------------------------------------ errors


def test_no_tokens_artifact_is_an_error(cli, workspace):
    code, _, err = cli("pretrain", *TINY)
    assert code == 2 and "featurize" in err


@pytest.mark.parametrize(
    "make_kwargs, extra, message",
    [
        (dict(val_fraction=0.0), [], "val.bin holds 0 tokens"),
        (dict(meta_overrides={"vocab_size": 70000}), [], "does not fit the shards' dtype uint16"),
        (dict(), ["--arch", "{n_heads: 5}"], "does not divide dim"),
        (dict(), ["--arch", "{n_layerz: 5}"], "unknown key 'n_layerz'"),
        (dict(), ["--context", "100000"], "context"),
        (dict(), ["--cuda-graphs"], "--cuda-graphs needs --compile and one CUDA device (this run: compile off"),
        (dict(), ["--compile", "--cuda-graphs", "--device", "cpu"], "(this run: compile on, 1 x cpu)"),
    ],
)
def test_bad_input_is_one_line_error_before_training(cli, workspace, make_kwargs, extra, message):
    make_tokens_artifact(**make_kwargs)
    code, out, err = cli("pretrain", *TINY, *extra)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (workspace / "artifacts" / "pretrain").exists() or not any((workspace / "artifacts" / "pretrain").iterdir())
    assert not (workspace / "runs").exists() or not any((workspace / "runs").rglob("*.safetensors"))


def test_missing_shard_is_an_error(cli, workspace):
    art = make_tokens_artifact()
    (art.path / "train.bin").unlink()
    code, _, err = cli("pretrain", *TINY)
    assert code == 2 and "no train.bin" in err


# ------------------------------------------------------------------ trainer parts


def test_window_sampler_is_deterministic_and_reads_the_shard(workspace):
    from dsk.train import TokenData

    art = make_tokens_artifact()
    a = TokenData.open(art.path, context=16, batch_size=3, seed=1)
    b = TokenData.open(art.path, context=16, batch_size=3, seed=1)
    x, y = a.batch(5, 0)
    assert torch.equal(x, b.batch(5, 0)[0]) and not torch.equal(x, a.batch(6, 0)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = np.fromfile(art.path / "train.bin", dtype=np.uint16)
    row = x[0].numpy()
    starts = [i for i in range(len(train) - 16) if np.array_equal(train[i : i + 16], row)]
    assert starts  # the window is a real slice of train.bin
    val = list(a.val_batches())
    assert sum(v[1].numel() for v in val) == ((len(np.fromfile(art.path / "val.bin", dtype=np.uint16)) - 1) // 16) * 16


def test_repeat_spans_make_chosen_rows_periodic_and_leave_the_rest():
    from dsk.train.data import MIN_REPEAT_SPAN, repeat_spans

    block = np.arange(40 * 65, dtype=np.int64).reshape(40, 65)  # all tokens distinct: a period is unambiguous
    out = repeat_spans(block, np.random.default_rng(3), 0.5)
    assert np.array_equal(out, repeat_spans(block, np.random.default_rng(3), 0.5))
    assert not np.array_equal(out, repeat_spans(block, np.random.default_rng(4), 0.5))
    assert np.array_equal(block, np.arange(40 * 65).reshape(40, 65))  # input untouched
    periods = []
    for row, orig in zip(out, block):
        if np.array_equal(row, orig):
            continue
        period = int(np.flatnonzero(row[1:] == row[0])[0]) + 1  # first return of the row's first token
        assert MIN_REPEAT_SPAN <= period <= 65 // 2
        assert np.array_equal(row[:period], orig[:period])  # the period is the window's own text
        assert np.array_equal(row, np.resize(orig[:period], 65))
        periods.append(period)
    assert 10 <= len(periods) <= 30 and len(set(periods)) > 3  # about half the rows, periods vary
    assert np.array_equal(repeat_spans(block, np.random.default_rng(3), 0.0), block)
    assert all(np.any(r != o) for r, o in zip(repeat_spans(block, np.random.default_rng(3), 1.0), block))


def test_repeat_fraction_batches_are_deterministic_and_plain_when_off(workspace):
    from dsk.train import TokenData
    from dsk.train.data import MIN_REPEAT_SPAN

    art = make_tokens_artifact()
    plain = TokenData.open(art.path, context=32, batch_size=8, seed=1)
    rep = TokenData.open(art.path, context=32, batch_size=8, seed=1, repeat_fraction=1.0)
    x0, y0 = plain.batch(2, 0)
    x1, y1 = rep.batch(2, 0)
    assert torch.equal(x1, TokenData.open(art.path, context=32, batch_size=8, seed=1, repeat_fraction=1.0).batch(2, 0)[0])
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and not torch.equal(x0, x1)
    assert torch.equal(x1[:, :MIN_REPEAT_SPAN], x0[:, :MIN_REPEAT_SPAN])  # the same windows, made periodic
    # ranks read their slice of the same global batch
    halves = [rep.shard(r, 2).batch(2, 0)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x1)
    assert [v[0].tolist() for v in rep.val_batches()] == [v[0].tolist() for v in plain.val_batches()]


def test_repeat_fraction_changes_the_artifact_id_only_when_set():
    from dsk.pretrain import Params

    assert "repeat_fraction" not in Params().model_dump(mode="json")  # ids of earlier artifacts stay valid
    assert Params(repeat_fraction=0.25).model_dump(mode="json")["repeat_fraction"] == 0.25
    assert Params(**Params(repeat_fraction=0.25).model_dump(mode="json")).repeat_fraction == 0.25
    assert "repeat_fraction" in Params.model_fields and Params.model_fields["repeat_fraction"].description
    assert "cuda_graphs" not in Params().model_dump(mode="json")
    assert Params(cuda_graphs=True).model_dump(mode="json")["cuda_graphs"] is True


def test_pretrain_with_repeat_fraction_gets_its_own_artifact(cli, workspace):
    make_tokens_artifact()
    ids = []
    for extra in ([], ["--repeat-fraction", "0.5"], []):
        code, out, err = cli("pretrain", *TINY[:1], "3", *TINY[2:], *extra, "--json")
        assert code == 0, err
        ids.append(json.loads(out)["id"])
    assert ids[0] == ids[2] != ids[1]


def test_muon_orthogonalises_and_keeps_head_and_router_on_adamw():
    from dsk.models import ModelConfig, Transformer
    from dsk.train import make_optimizer
    from dsk.train.optim import newton_schulz

    g = torch.randn(3, 48, 24)
    sv = torch.linalg.svdvals(newton_schulz(g))
    assert sv.min() > 0.5 and sv.max() < 1.3  # all singular values pulled toward 1
    model = Transformer(ModelConfig.preset("tiny", vocab_size=50, tie_embeddings=False))
    opt = make_optimizer(model, name="muon", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert "layers.1.ffn.experts.w1" in muon and "layers.0.attn.wkv_a.weight" in muon
    assert not {"head.weight", "layers.1.ffn.gate.weight", "embed.weight"} & muon


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "adamw"])
@pytest.mark.parametrize("max_norm,grad_gain", [(1.0, 10.0), (1.0, 1e-3), (math.inf, 10.0)],
                         ids=["clipped", "under-the-limit", "no-clip"])
def test_clip_and_step_is_clip_grad_norm_then_step(fused, max_norm, grad_gain):
    import copy

    from dsk.train.optim import clip_and_step

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref, unclipped = copy.deepcopy(ours), copy.deepcopy(ours)
    opt_ours, opt_ref, opt_unclipped = (torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused)
                                        for m in (ours, ref, unclipped))
    for _ in range(3):
        x = torch.randn(5, 8)
        for m in (ours, ref, unclipped):
            (m(x).square().sum() * grad_gain).backward()
        norm = clip_and_step(opt_ours, list(ours.parameters()), max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm)
        opt_ref.step()
        opt_unclipped.step()
        for opt in (opt_ours, opt_ref, opt_unclipped):
            opt.zero_grad()
        assert torch.allclose(norm, ref_norm)
    assert not hasattr(opt_ours, "grad_scale")  # the divisor does not leak into later steps
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # where the norm was above the limit the clip acted: plain steps land elsewhere
    acted = max_norm < math.inf and grad_gain > 1
    moved_apart = any(not torch.allclose(a, b) for a, b in zip(ours.parameters(), unclipped.parameters()))
    assert moved_apart == acted


def test_lr_schedule_and_param_groups():
    from dsk.models import ModelConfig, Transformer
    from dsk.train import lr_at, param_groups

    assert lr_at(0, base_lr=1.0, warmup=10, min_ratio=0.1, progress=0) == pytest.approx(0.1)
    assert lr_at(9, base_lr=1.0, warmup=10, min_ratio=0.1, progress=0) == pytest.approx(1.0)
    assert lr_at(10, base_lr=1.0, warmup=10, min_ratio=0.1, progress=0.0) == pytest.approx(1.0)
    assert lr_at(50, base_lr=1.0, warmup=10, min_ratio=0.1, progress=0.5) == pytest.approx(0.55)
    assert lr_at(99, base_lr=1.0, warmup=10, min_ratio=0.1, progress=1.0) == pytest.approx(0.1)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.weight", "norm.weight", "layers.0.attn_norm.weight"}
    assert "layers.1.ffn.experts.w1" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer, lr", [("lion", 3e-4), ("muon", 3e-3)])
def test_other_optimizers_train(workspace, optimizer, lr):
    from dsk.pretrain import run

    make_tokens_artifact()
    result = run(params=tiny_params(optimizer=optimizer, lr=lr, max_steps=20, eval_every=0, preset="tiny"))
    records = [json.loads(x) for x in (result.artifact.path / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert train[-1] < train[0]
