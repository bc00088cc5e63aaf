"""Finetune building blocks: JSONL parsing and errors, the chat mask, packing, LoRA, merge, DPO loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dsk.errors import DskError
from dsk.finetune import data as fdata
from dsk.models.lora import LoraConfig, add_lora, count_params, merge_lora, save_adapters
from finetune_helpers import char_tokenizer, copy_rows, one_thread, tiny_model, write_jsonl

_ = one_thread  # autouse fixture


# --------------------------------------------------------------------------- data


def test_reads_both_instruction_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "copy: ab", "response": "ab"},
        "",
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}]},
    ])
    recs, rejects = fdata.read_jsonl(path, kind="instruction", bad_lines="fail")
    assert [r.line for r in recs] == [1, 3] and rejects == []
    assert recs[0].messages == [{"role": "user", "content": "copy: ab"}, {"role": "assistant", "content": "ab"}]
    assert recs[1].prompt_messages[-1] == {"role": "user", "content": "hi"} and recs[1].answer == "yo"


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "x", "response": ', "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"text": "x"}', "expected"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b"}', "--method dpo"),
])
def test_bad_lines_fail_with_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(DskError) as exc:
        fdata.read_jsonl(path, kind="instruction", bad_lines="fail")
    msg = str(exc.value)
    assert f"{path}:2:" in msg and reason in msg and "\n" not in msg


def test_bad_lines_skip_goes_to_rejects(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "{oops", {"prompt": "c", "response": "d"}])
    recs, rejects = fdata.read_jsonl(path, kind="instruction", bad_lines="skip")
    assert [r.line for r in recs] == [1, 3]
    assert rejects[0]["line"] == 2 and "not valid JSON" in rejects[0]["reason"]


def test_preference_rows_need_all_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DskError, match=r"p.jsonl:2: .*'rejected' is missing"):
        fdata.read_jsonl(path, kind="preference", bad_lines="fail")


def test_too_long_example_is_an_error(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a" * 100, "response": "b"}])
    recs, rejects = fdata.read_jsonl(path, kind="instruction", bad_lines="fail")
    with pytest.raises(DskError, match=r"d.jsonl:2: the example is \d+ tokens, longer than the context of 32"):
        fdata.encode_instructions(recs, tok, context=32, path=path, bad_lines="fail", rejects=rejects)
    kept = fdata.encode_instructions(recs, tok, context=32, path=path, bad_lines="skip", rejects=rejects)
    assert len(kept) == 1 and rejects[-1]["line"] == 2


# --------------------------------------------------------------------------- mask + packing


def _sft(tok, rows, *, packing=True, context=64):
    recs = [fdata.parse_line(json.dumps(r), "instruction", i) for i, r in enumerate(rows, 1)]
    enc = fdata.encode_instructions(recs, tok, context=context, path=None, bad_lines="fail", rejects=[])
    return enc, fdata.SFTData.build(enc, [], context=context, pad_id=tok.pad_id, packing=packing,
                                    batch_size=4, grad_accum=1, seed=0)


def test_targets_are_only_assistant_tokens():
    tok = char_tokenizer()
    enc, data = _sft(tok, [{"system": "sys", "prompt": "copy: abc", "response": "abc"}], packing=False)
    ids = enc[0].ids
    x, y = data.batch(0)
    trained = y[0][y[0] != -100].tolist()
    # exactly the answer's characters and the closing <|end|>
    assert trained == tok.encode("abc") + [tok.end_id]
    assert tok.special["assistant"] in ids and x[0, : len(ids) - 1].tolist() == ids[:-1]


def test_masking_puts_zero_loss_on_prompt_tokens():
    """Changing every prompt token's prediction cannot change the loss; changing the answer's does."""
    tok = char_tokenizer()
    _, data = _sft(tok, copy_rows(6))
    model = tiny_model(tok)
    x, y = data.batch(0)
    logits = model(x).logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
    loss.backward()
    grad_rows = logits.grad.abs().sum(-1)
    assert (grad_rows[y == -100] == 0).all()
    assert (grad_rows[y != -100] > 0).all()
    assert (y != -100).sum() < (y == -100).sum()  # prompts + role tokens + padding dominate


def test_packing_fills_rows_without_splitting_examples():
    tok = char_tokenizer()
    rows = copy_rows(20)
    enc, packed = _sft(tok, rows, packing=True, context=64)
    _, single = _sft(tok, rows, packing=False, context=64)
    assert single.n_train_rows == 20 and packed.n_train_rows < 20 / 2
    # every example starts with <|bos|>, and each row holds whole examples
    n_bos = int((torch.from_numpy(packed.train_ids) == tok.bos_id).sum())
    assert n_bos == 20
    assert int((torch.from_numpy(packed.train_labels) != -100).sum()) == sum(sum(e.mask) for e in enc)


def test_batches_are_a_function_of_the_step():
    tok = char_tokenizer()
    _, a = _sft(tok, copy_rows(30), packing=False)
    _, b = _sft(tok, copy_rows(30), packing=False)
    assert torch.equal(a.batch(5, 0)[0], b.batch(5, 0)[0])
    assert not torch.equal(a.batch(5, 0)[0], a.batch(6, 0)[0])


# --------------------------------------------------------------------------- LoRA + merge


@pytest.mark.parametrize("preset, targets", [("tiny", ("attn", "mlp", "experts")), ("tiny-dense", ("attn", "mlp"))])
def test_only_adapter_params_change_under_lora(preset, targets):
    tok = char_tokenizer()
    model = tiny_model(tok, preset=preset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=targets, token_ids=[tok.end_id, tok.special["user"]]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _, data = _sft(tok, copy_rows(8))
    for step in range(3):
        x, y = data.batch(step)
        model(x, targets=y).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith("load"):  # MoE routing counters (not weights)
            continue
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_B" in k)


def logits_with_random_adapters(model, vocab_size: int):
    """Give every adapter parameter random values (fresh B matrices are zero) and return a batch
    of token ids with the model's logits on it."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model.eval()
    x = torch.randint(0, vocab_size, (2, 20))
    return x, model(x).logits


@pytest.mark.parametrize("preset, targets, arch, dora", [
    ("tiny", ("attn", "mlp", "experts"), {}, False),
    ("tiny-dense", ("attn", "mlp"), {}, False),
    ("tiny-dense", ("attn",), {"tie_embeddings": False}, False),
    ("tiny", ("attn", "mlp"), {}, True),
    ("tiny-dense", ("attn", "mlp"), {}, True),
])
def test_merged_logits_equal_base_plus_adapter(preset, targets, arch, dora, tmp_path):
    from dsk.models import load_model, save_model

    tok = char_tokenizer()
    model = tiny_model(tok, preset=preset, **arch)
    save_model(model, tmp_path, tokenizer=tok.hf)
    cfg = add_lora(model, LoraConfig(rank=4, alpha=8, targets=targets, dora=dora, token_ids=[tok.end_id, tok.bos_id]))
    assert dora == any("lora_magnitude" in n for n, _ in model.named_parameters())
    x, with_adapters = logits_with_random_adapters(model, tok.vocab_size)
    save_adapters(model, cfg, tmp_path)  # next to the base: an unmerged LoRA artifact
    merged = copy.deepcopy(model)
    assert merge_lora(merged) > 0
    assert not any("lora_" in n for n in merged.state_dict())
    assert (merged.head.weight is merged.embed.weight) == merged.cfg.tie_embeddings
    torch.testing.assert_close(merged(x).logits, with_adapters, rtol=1e-4, atol=1e-5)
    loaded, _, _ = load_model(tmp_path)  # load_model folds the adapters in
    torch.testing.assert_close(loaded(x).logits, with_adapters, rtol=1e-4, atol=1e-5)
    plain = tiny_model(tok, preset=preset, **arch).eval()
    assert (plain(x).logits - with_adapters).abs().max() > 1e-3  # the adapters did change the output


def test_lora_trainable_fraction_is_small():
    tok = char_tokenizer()
    model = tiny_model(tok, preset="tiny-dense", dim=128, n_heads=4, n_kv_heads=4, inter_dim=384, n_layers=4)
    add_lora(model, LoraConfig(rank=2, alpha=4, targets=("attn",)))
    trainable, total = count_params(model)
    assert trainable / total < 0.02


def test_lora_projections_restrict_the_adapters_and_still_merge_exactly(tmp_path):
    from dsk.models import load_model, save_model

    tok = char_tokenizer()
    model = tiny_model(tok, preset="tiny-dense")
    save_model(model, tmp_path, tokenizer=tok.hf)
    cfg = add_lora(model, LoraConfig(rank=4, alpha=8, targets=("attn", "mlp"), projections=("wv", "wo", "w2")))
    assert {m.rsplit(".", 1)[-1] for m in cfg.modules} == {"wv", "wo", "w2"}
    x, with_adapters = logits_with_random_adapters(model, tok.vocab_size)
    save_adapters(model, cfg, tmp_path)
    loaded, _, _ = load_model(tmp_path)  # the stored config re-creates the same adapters
    torch.testing.assert_close(loaded(x).logits, with_adapters, rtol=1e-4, atol=1e-5)
    with pytest.raises(DskError, match="not one of"):
        add_lora(tiny_model(tok, preset="tiny-dense"), LoraConfig(targets=("attn",), projections=("wx",)))
    with pytest.raises(DskError, match="'w1' is not in this model's attn"):
        add_lora(tiny_model(tok, preset="tiny-dense"), LoraConfig(targets=("attn",), projections=("w1",)))


def test_fresh_dora_adapters_leave_the_model_unchanged_and_refuse_dropout():
    tok = char_tokenizer()
    model = tiny_model(tok, preset="tiny-dense").eval()
    x = torch.randint(0, tok.vocab_size, (2, 12))
    before = model(x).logits
    add_lora(model, LoraConfig(rank=2, alpha=4, targets=("attn",), dora=True))
    torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(DskError, match="dropout"):
        add_lora(tiny_model(tok, preset="tiny-dense"), LoraConfig(targets=("attn",), dora=True, dropout=0.1))


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate():
    from dsk.finetune import Params
    from dsk.finetune.stage import train_config
    from dsk.train import make_optimizer

    tok = char_tokenizer()
    model = tiny_model(tok, preset="tiny-dense")
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("attn",), token_ids=[tok.end_id]))
    cfg = train_config(Params(data="x.jsonl", lora_plus_ratio=16, lr=1e-3))
    assert train_config(Params(data="x.jsonl", lr=1e-3)).lr_mults == {}
    assert train_config(Params(data="x.jsonl", method="full", lora_plus_ratio=16)).lr_mults == {}  # no adapters
    assert train_config(Params(data="x.jsonl", method="dpo", lora_plus_ratio=16)).lr_mults == {"lora_B": 16}
    opt = make_optimizer(model, name="adamw", lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95), device="cpu",
                         lr_mults=cfg.lr_mults)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs and all(("lora_B" in n) == (lr == pytest.approx(1.6e-2)) for n, lr in lrs.items())
    assert all(lr == pytest.approx(1e-3) for n, lr in lrs.items() if "lora_B" not in n)
    assert any("token_delta" in n for n in lrs)


def test_lora_on_experts_of_a_dense_model_is_an_error():
    tok = char_tokenizer()
    with pytest.raises(DskError, match="match no module"):
        add_lora(tiny_model(tok, preset="tiny-dense"), LoraConfig(targets=("experts",)))
    with pytest.raises(DskError, match="match no module"):  # the chat-token rows alone are not the targets
        add_lora(tiny_model(tok, preset="tiny-dense"), LoraConfig(targets=("experts",), token_ids=[tok.end_id]))


def test_lora_projections_are_refused_with_the_experts_target():
    # LoraExperts adapts w1, w2 and w3 together: a projection subset there would be silently ignored
    tok = char_tokenizer()
    for targets in (("experts",), ("attn", "experts")):
        with pytest.raises(DskError, match="routed experts take adapters on w1, w2 and w3 together"):
            add_lora(tiny_model(tok, preset="tiny"), LoraConfig(targets=targets, projections=("w1",)))


# --------------------------------------------------------------------------- DPO


def test_dpo_loss_decreases_and_margin_grows():
    from dsk.finetune.dpo import DPOObjective
    from finetune_helpers import preference_rows

    tok = char_tokenizer()
    recs = [fdata.parse_line(json.dumps(r), "preference", i) for i, r in enumerate(preference_rows(16), 1)]
    pairs = fdata.encode_preferences(recs, tok, context=64, path=None, bad_lines="fail", rejects=[])
    data = fdata.PreferenceData.build(pairs, [], pad_id=tok.pad_id, batch_size=16, grad_accum=1, seed=0)
    policy = tiny_model(tok, preset="tiny-dense")
    objective = DPOObjective(copy.deepcopy(policy), beta=0.5)
    add_lora(policy, LoraConfig(rank=4, alpha=8, targets=("attn", "mlp")))
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-3)
    x, y = data.batch(0)  # the whole tiny set, every step
    history = []
    for _ in range(25):
        loss, stats = objective(policy, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append((float(loss.detach()), stats["reward_margin"], stats["reward_acc"]))
    assert history[0][0] == pytest.approx(0.6931, abs=1e-3) and history[0][1] == pytest.approx(0.0, abs=1e-5)
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] > 1.0 and history[-1][2] == 1.0


# --------------------------------------------------------------------------- sample data


def test_sample_tasks_are_reproducible_small_and_valid(tmp_path):
    import importlib.util

    from finetune_helpers import REPO

    spec = importlib.util.spec_from_file_location("make_sample_tasks", REPO / "scripts" / "make_sample_tasks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(tmp_path)
    shipped = REPO / "data" / "sample" / "tasks"
    names = sorted(p.name for p in shipped.glob("*.jsonl"))
    assert names == ["heldout.jsonl", "preferences.jsonl", "preferences_heldout.jsonl", "train.jsonl"]
    assert all((tmp_path / n).read_bytes() == (shipped / n).read_bytes() for n in names)
    assert sum((shipped / n).stat().st_size for n in names) < 1_000_000
    train, _ = fdata.read_jsonl(shipped / "train.jsonl", kind="instruction", bad_lines="fail")
    held, _ = fdata.read_jsonl(shipped / "heldout.jsonl", kind="instruction", bad_lines="fail")
    prefs, _ = fdata.read_jsonl(shipped / "preferences.jsonl", kind="preference", bad_lines="fail")
    assert len(train) == 2000 and len(held) == 200 and len(prefs) == 600
    seen = {r.prompt_messages[-1]["content"] for r in train}
    assert not any(r.prompt_messages[-1]["content"] in seen for r in held)  # held-out is unseen


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_packed_rows_equal_examples_run_apart(preset):
    """With the segment mask, a packed row's logits equal each example's logits on its own."""
    tok = char_tokenizer()
    enc, data = _sft(tok, copy_rows(6), packing=True)
    model = tiny_model(tok, preset=preset).eval()
    x = torch.from_numpy(data.train_ids[:1])
    segments = torch.cumsum(x == tok.bos_id, dim=1)
    packed = model(x, segments=segments).logits[0]
    starts = (x[0] == tok.bos_id).nonzero().flatten().tolist()
    assert len(starts) > 1
    for s, e in zip(starts, starts[1:]):
        alone = model(x[:, s:e]).logits[0]
        torch.testing.assert_close(packed[s:e], alone, rtol=1e-4, atol=1e-5)
    # and without the mask they differ (the later examples see the earlier ones)
    assert (model(x).logits[0, starts[1]:starts[2]] - packed[starts[1]:starts[2]]).abs().max() > 1e-4


def test_params_added_later_leave_existing_artifact_ids_alone():
    # the dump is the artifact id's params: new LoRA fields at their defaults must not move the ids
    # made before them, while the moved LoRA default lr must (a lora run on the default records it)
    from dsk.finetune import Params
    from dsk.finetune.params import DEFAULT_LR

    new = {"lora_projections", "lora_dora", "lora_plus_ratio"}
    for method in ("lora", "full", "dpo"):
        assert not new & set(Params(data="x.jsonl", method=method, lr=1e-3).model_dump(mode="json"))
    assert Params(data="x.jsonl", method="full").model_dump(mode="json")["lr"] is None
    assert Params(data="x.jsonl").model_dump(mode="json")["lr"] == DEFAULT_LR["lora"]
    dump = Params(data="x.jsonl", lora_projections="wv", lora_dora=True, lora_plus_ratio=4).model_dump(mode="json")
    assert (dump["lora_projections"], dump["lora_dora"], dump["lora_plus_ratio"]) == (["wv"], True, 4.0)
