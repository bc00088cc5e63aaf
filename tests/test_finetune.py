"""`dsk finetune` end to end on tiny CPU runs: artifact files, cache hit, merge, DPO, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_helpers import one_thread, copy_rows, make_base, preference_rows, write_jsonl

TINY = ["--max-steps", "6", "--batch-size", "4", "--log-every", "2", "--warmup-steps", "1", "--eval-examples", "4",
        "--threads", "1"]
LORA_FILES = ["adapter.safetensors", "adapter_config.json", "config.json", "curves.png", "finetune.json", "log.txt",
              "manifest.json", "metrics.jsonl", "model.safetensors", "rejects.jsonl", "timing.jsonl", "tokenizer.json"]
PLAIN_FILES = [f for f in LORA_FILES if not f.startswith("adapter")]
_ = one_thread  # autouse fixture


@pytest.fixture
def base(workspace):
    from dsk.artifacts import Store

    return make_base(Store.open(), preset="tiny", max_seq_len=64)


def _artifacts(workspace, stage="finetune"):
    d = workspace / "artifacts" / stage
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _run_json(cli, *args):
    code, out, err = cli("finetune", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ end to end


def test_lora_end_to_end_files_lineage_and_cache_hit(cli, workspace, base, tmp_path):
    from dsk.models import load_model

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(24) + ["{broken"])
    first = _run_json(cli, "--data", str(data), "--bad-lines", "skip", *TINY)
    assert not first["cached"] and first["kind"] == "model"
    path = workspace / "artifacts" / "finetune" / first["id"]
    assert sorted(p.name for p in path.iterdir()) == LORA_FILES
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["inputs"][0]["id"] == base.id and manifest["inputs"][1]["type"] == "raw"
    info = json.loads((path / "finetune.json").read_text())
    assert info["base_model"]["id"] == base.id and info["method"] == "lora" and not info["merged"]
    rejects = [json.loads(line) for line in (path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [25]
    m = first["metrics"]
    assert m["base_model_id"] == base.id and m["n_rejected"] == 1 and 0 < m["trainable_fraction"] < 1
    assert 0.0 <= m["val_exact_match"] <= 1.0 and m["steps"] == 6
    model, tok, _ = load_model(path)  # adapters folded in: a plain model for downstream stages
    assert not any("lora_" in n for n, _ in model.named_parameters()) and tok is not None

    again = _run_json(cli, "--data", str(data), "--bad-lines", "skip", *TINY)
    assert again["cached"] and again["id"] == first["id"]
    # the data is part of the id by content
    write_jsonl(data, copy_rows(25))
    changed = _run_json(cli, "--data", str(data), "--bad-lines", "skip", *TINY)
    assert changed["id"] != first["id"] and not changed["cached"]


def test_merge_gives_a_plain_model_with_the_same_logits(cli, workspace, base, tmp_path):
    from dsk.models import load_model

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(24))
    unmerged = _run_json(cli, "--data", str(data), "--lr", "0.01", *TINY)
    merged = _run_json(cli, "--data", str(data), "--lr", "0.01", "--merge", *TINY)
    root = workspace / "artifacts" / "finetune"
    assert sorted(p.name for p in (root / merged["id"]).iterdir()) == PLAIN_FILES
    a, _, _ = load_model(root / unmerged["id"])
    b, _, _ = load_model(root / merged["id"])
    base_model, _, _ = load_model(base.path)
    x = torch.randint(0, a.cfg.vocab_size, (2, 24))
    torch.testing.assert_close(b(x).logits, a(x).logits, rtol=1e-4, atol=1e-5)
    assert (base_model(x).logits - a(x).logits).abs().max() > 1e-4  # the adapters learned something
    # an unmerged artifact's model.safetensors is the untouched base
    assert (root / unmerged["id"] / "model.safetensors").read_bytes() == (base.path / "model.safetensors").read_bytes()


def test_full_finetuning_trains_every_weight(cli, workspace, base, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(24))
    res = _run_json(cli, "--data", str(data), "--method", "full", *TINY)
    assert res["metrics"]["trainable_fraction"] == 1.0
    assert sorted(p.name for p in (workspace / "artifacts" / "finetune" / res["id"]).iterdir()) == PLAIN_FILES


def test_dpo_on_the_sft_model_logs_margins_and_accuracy(cli, workspace, base, tmp_path):
    sft = _run_json(cli, "--data", str(write_jsonl(tmp_path / "t.jsonl", copy_rows(24))), "--merge", *TINY)
    prefs = write_jsonl(tmp_path / "p.jsonl", preference_rows(24))
    res = _run_json(cli, "--data", str(prefs), "--method", "dpo", "--beta", "0.5", "--val-fraction", "0.25", *TINY)
    m = res["metrics"]
    assert m["base_model_id"] == sft["id"]  # dpo starts from (and is anchored to) the latest finetune
    assert {"reward_margin", "reward_acc", "val_pref_acc", "val_pref_acc_before"} <= set(m)
    records = [json.loads(line) for line in (workspace / "artifacts" / "finetune" / res["id"] / "metrics.jsonl")
               .read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records and all("reward_margin" in r and "reward_acc" in r for r in train_records)


def test_train_alias_and_show_template(cli, workspace, base, tmp_path):
    code, out, err = cli("finetune", "--show-template")
    assert code == 0 and "<|assistant|>" in out and "<|end|>" in out and "Loss" in out
    assert _artifacts(workspace) == []
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(24))
    code, out, err = cli("train", "--stage", "finetune", "--data", str(data), *TINY)
    assert code == 0, err
    assert len(_artifacts(workspace)) == 1


# ------------------------------------------------------------------ resume


def test_resume_after_a_kill_is_bit_identical(workspace, base, tmp_path, monkeypatch):
    from dsk.finetune import Params, run
    from dsk.finetune.data import SFTData

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(40))
    params = Params(data=str(data), max_steps=8, batch_size=4, log_every=2, warmup_steps=1, eval_examples=2,
                    checkpoint_every=3, threads=1)
    real_batch = SFTData.batch

    def dying_batch(self, step, micro=0):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, step, micro)

    monkeypatch.setattr(SFTData, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        run(params=params)
    assert _artifacts(workspace) == []
    [run_dir] = list((workspace / "runs" / "finetune").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    monkeypatch.setattr(SFTData, "batch", real_batch)

    resumed = run(params=params, resume=True).artifact
    assert resumed.metrics["resumed_from_step"] == 6
    fresh = run(params=params, force=True).artifact
    assert fresh.metrics["resumed_from_step"] == 0
    for name in ("adapter.safetensors", "model.safetensors", "metrics.jsonl"):
        assert (fresh.path / name).read_bytes() == (resumed.path / name).read_bytes(), name


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a", "response": "b"}, '{"prompt": "a", "response": '], "train.jsonl:2: not valid JSON"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "train.jsonl:1: the conversation has no assistant turn"),
    ([{"prompt": "a" * 80, "response": "b"}], "train.jsonl:1: the example is"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "use --method dpo"),
])
def test_bad_data_is_one_line_before_training(cli, workspace, base, tmp_path, rows, expected):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    before = data.read_bytes()
    code, out, err = cli("finetune", "--data", str(data), *TINY)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert _artifacts(workspace) == [] and data.read_bytes() == before


def test_base_that_is_not_a_language_model(cli, workspace, tmp_path):
    from dsk.artifacts import Store

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(4))
    code, _, err = cli("finetune", "--data", str(data), *TINY)
    assert code == 2 and "run `dsk pretrain` first" in err
    not_a_model = make_base(Store.open(), kind="tokens")
    code, _, err = cli("finetune", not_a_model.id, "--data", str(data), *TINY)
    assert code == 2 and "needs a language model" in err
    no_tokenizer = make_base(Store.open(), tokenizer=False, seed=1)
    code, _, err = cli("finetune", no_tokenizer.id, "--data", str(data), *TINY)
    assert code == 2 and "has no tokenizer.json" in err
    assert _artifacts(workspace) == []


def test_missing_data_and_data_given_as_input(cli, workspace, base, tmp_path):
    code, _, err = cli("finetune", *TINY)
    assert code == 2 and "--data PATH" in err
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(4))
    code, _, err = cli("finetune", str(data), *TINY)
    assert code == 2 and f"--data {data}" in err
    code, _, err = cli("finetune", "--data", str(tmp_path / "nope.jsonl"), *TINY)
    assert code == 2 and "does not exist" in err
    code, _, err = cli("finetune", "--data", str(data), "--context", "100", *TINY)
    assert code == 2 and "exceeds the base model's max_seq_len=64" in err
    assert _artifacts(workspace) == []


def test_bad_lora_shape_options_are_one_line_errors(cli, workspace, base, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(8))
    for args, expected in [(["--lora-projections", "wx"], "LoRA projection 'wx' is not one of"),
                           (["--lora-projections", "wq,wv"], "LoRA projection 'wv' is not in this model's attn"),
                           (["--lora-dora", "--lora-dropout", "0.1"], "DoRA adapters take no dropout"),
                           (["--lora-targets", "attn,experts", "--lora-projections", "wo"], "w1, w2 and w3 together"),
                           (["--lora-plus-ratio", "0.5"], "lora_plus_ratio"),
                           (["--method", "full", "--lora-rank", "4", "--lora-dora"],
                            "--lora-rank, --lora-dora only apply to LoRA adapters, and --method full trains every weight"),
                           (["--method", "dpo", "--dpo-train", "full", "--lora-plus-ratio", "4"],
                            "--lora-plus-ratio only applies to LoRA adapters, and --method dpo --dpo-train full")]:
        code, _, err = cli("finetune", "--data", str(data), *args, *TINY)
        assert code == 2 and expected in err, err
        assert "Traceback" not in err
    assert _artifacts(workspace) == []


def test_lora_plus_dora_and_projections_train_end_to_end(cli, workspace, base, tmp_path):
    from dsk.models import load_model

    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(24))
    res = _run_json(cli, "--data", str(data), "--lora-dora", "--lora-plus-ratio", "8", "--lora-projections", "wq,wkv_b,wo",
                    *TINY)
    path = workspace / "artifacts" / "finetune" / res["id"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["dora"] and cfg["projections"] == ["wq", "wkv_b", "wo"]
    assert {m.rsplit(".", 1)[-1] for m in cfg["modules"]} == {"wq", "wkv_b", "wo", "embed", "head"}
    model, _, _ = load_model(path)
    assert not any("lora_" in n for n in model.state_dict())
