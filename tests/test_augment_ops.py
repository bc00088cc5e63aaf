"""Unit tests of the augmentation op library: each op's invariants, determinism, validation."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from dsk.data import augment_image as ai
from dsk.data import augment_series as aser
from dsk.data import augment_text as at
from dsk.data.augment_ops import OPS, compose, parse_ops
from dsk.errors import DskError

TEXT = ("The quick brown fox jumps over the lazy dog. It was a good day, and everyone "
        "seemed happy! Then the NASA engineers went home to rest.")
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text)


@pytest.fixture(scope="module")
def syn():
    return at.load_synonyms()


# ------------------------------------------------------------------ text


def test_synonym_table_is_shipped_and_sane(syn):
    assert 3000 < len(syn) < 50000
    assert "quick" in syn and "fast" in syn["quick"]
    assert not any(w in syn for w in ("the", "and", "not", "is"))  # stop words never keys


def test_deletion_never_empties():
    for seed in range(50):
        for text in ("Hello world.", "One", "a b c d e f", TEXT):
            out = at.delete_words(text, random.Random(seed), rate=1.0)
            assert words(out), (text, out)
    out = at.delete_words("Alpha beta gamma.", random.Random(0), rate=1.0)
    assert len(words(out)) == 1 and out.endswith(".") and "  " not in out


def test_swap_keeps_multiset_of_words_and_punctuation():
    for seed in range(30):
        out = at.swap_words(TEXT, random.Random(seed), rate=0.3)
        assert Counter(words(out)) == Counter(words(TEXT))
        assert re.sub(r"\w", "", out) == re.sub(r"\w", "", TEXT)  # punctuation and spacing in place
    assert at.swap_words(TEXT, random.Random(0), rate=0.3) != TEXT


def test_synonym_replacement_keeps_stop_words_casing_and_punctuation(syn):
    text = "The QUICK fox was quick. Happy people run fast!"
    changed = 0
    for seed in range(30):
        out = at.replace_synonyms(text, random.Random(seed), rate=0.5, synonyms=syn)
        before, after = words(text), words(out)
        assert len(before) == len(after)
        for a, b in zip(before, after):
            if a.lower() in at.STOP_WORDS:
                assert a == b
            if a != b:
                changed += 1
                assert b.lower() in syn[a.lower()]
                assert (a.isupper(), a[0].isupper()) == (b.isupper(), b[0].isupper())
        assert re.sub(r"[^\W\d_]+", "", out) == re.sub(r"[^\W\d_]+", "", text)
    assert changed > 0


def test_insertion_adds_synonyms_and_keeps_opening_word(syn):
    out = at.insert_synonyms(TEXT, random.Random(3), rate=0.2, synonyms=syn)
    added = Counter(words(out).copy())
    added.subtract(Counter(words(TEXT)))
    assert sum(added.values()) == max(1, int(0.2 * len(words(TEXT))))
    assert out.startswith("The ") and out.endswith("rest.")


def test_sentence_shuffle_keeps_sentences():
    out = at.shuffle_sentences(TEXT, random.Random(1))
    split = lambda t: sorted(at.SENTENCE_END.split(t))  # noqa: E731
    assert split(out) == split(TEXT) and out != TEXT


def test_text_determinism():
    aug = compose([{"type": "EDA", "params": {"synonym_replacement": 0.2, "random_insertion": 0.2,
                                              "random_swap": 0.2, "random_deletion": 0.2}},
                   {"type": "SentenceShuffle", "p": 0.5}], modality="text")
    assert aug(TEXT, seed=7).output == aug(TEXT, seed=7).output
    assert aug(TEXT, seed=7).ops == aug(TEXT, seed=7).ops
    outs = {aug(TEXT, seed=s).output for s in range(10)}
    assert len(outs) > 5


def test_chat_only_user_turns_change():
    chat = {"messages": [
        {"role": "system", "content": "You are a quick and helpful assistant."},
        {"role": "user", "content": "Please explain why the quick brown fox jumps over the lazy dog."},
        {"role": "assistant", "content": "Because the quick fox is happy and the dog is lazy."},
    ]}
    aug = compose([{"type": "EDA", "params": {"synonym_replacement": 0.5, "random_swap": 0.5}}], modality="text")
    for seed in range(5):
        out = json.loads(aug(json.dumps(chat), seed=seed).output)
        assert out["messages"][0] == chat["messages"][0]
        assert out["messages"][2] == chat["messages"][2]
        assert out["messages"][1]["content"] != chat["messages"][1]["content"]
    inst = {"instruction": "Describe a quick fox jumping over a lazy dog today.", "output": "A quick fox jumped."}
    out = json.loads(aug(json.dumps(inst), seed=0).output)
    assert out["output"] == inst["output"] and out["instruction"] != inst["instruction"]


# ------------------------------------------------------------------ images


def _imgs(n=6, c=3, h=12, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


def test_rotation_zero_is_identity():
    x = _imgs()
    out, _, _ = ai.rotate(x, None, np.random.default_rng(0), np.ones(6, bool), degrees=[0.0, 0.0])
    assert torch.equal(out, x)
    aug = compose([{"type": "RandomRotation", "params": {"degrees": 0}}], modality="image")
    assert torch.equal(aug(x, seed=3).output, x)


def test_rotation_by_90_matches_rot90():
    x = _imgs(h=9, w=9)
    rng = np.random.default_rng(0)
    out, _, _ = ai.rotate(x, None, rng, np.ones(6, bool), degrees=[90.0, 90.0])
    assert torch.allclose(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5) or \
        torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5)


def test_flips_and_mask():
    x = _imgs()
    mask = np.array([True, False] * 3)
    out, _, _ = ai.hflip(x, None, None, mask)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    out, _, _ = ai.vflip(x, None, None, mask)
    assert torch.equal(out[2], x[2].flip(-2)) and torch.equal(out[3], x[3])


def test_resized_crop_full_box_is_identity_and_shape_kept():
    x = _imgs()
    out, _, _ = ai.resized_crop(x, None, np.random.default_rng(0), np.ones(6, bool), scale=[1.0, 1.0], ratio=[1.0, 1.0])
    assert torch.allclose(out, x, atol=1e-5)
    out, _, _ = ai.resized_crop(x, None, np.random.default_rng(0), np.ones(6, bool), scale=[0.2, 0.5], ratio=[0.75, 1.33])
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_color_jitter_and_noise():
    x = _imgs()
    out, _, _ = ai.color_jitter(x, None, np.random.default_rng(0), np.ones(6, bool), brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.allclose(out, x, atol=1e-6)
    out, _, _ = ai.color_jitter(x, None, np.random.default_rng(0), np.ones(6, bool), brightness=0.5, contrast=0.5, saturation=0.5)
    assert out.shape == x.shape and not torch.allclose(out, x)
    out, _, _ = ai.gaussian_noise(x, None, np.random.default_rng(0), np.ones(6, bool), sigma=0.1)
    assert 0.08 < (out - x).std().item() < 0.12


def test_mixup_labels_sum_to_one_and_match_lambda():
    x, y = _imgs(n=16), ai.one_hot(np.arange(16) % 4)
    out, ys, details = ai.mixup(x, y, np.random.default_rng(0), np.ones(16, bool), alpha=0.4)
    assert torch.allclose(ys.sum(1), torch.ones(16))
    for i, d in enumerate(details):
        j, lam = d["partner"], d["lam"]
        expected = lam * y[i] + (1 - lam) * y[j]
        assert torch.allclose(ys[i], expected, atol=1e-5)
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)


def test_cutmix_label_weight_equals_pasted_area():
    x, y = _imgs(n=16), ai.one_hot(np.arange(16) % 4)
    out, ys, details = ai.cutmix(x, y, np.random.default_rng(1), np.ones(16, bool), alpha=1.0)
    assert torch.allclose(ys.sum(1), torch.ones(16))
    h, w = x.shape[2:]
    some_pasted = False
    for i, d in enumerate(details):
        j = d["partner"]
        pasted = (out[i] != x[i]).any(0).float().mean().item()  # fraction of pixels that changed
        y0, x0, y1, x1 = d["box"]
        area = (y1 - y0) * (x1 - x0) / (h * w)
        if j != i:
            assert pasted == pytest.approx(area, abs=1e-6)
        some_pasted |= area > 0
        assert torch.allclose(ys[i], (1 - area) * y[i] + area * y[j], atol=1e-6)
    assert some_pasted


def test_image_determinism_and_mixup_needs_labels():
    aug = compose([{"type": "RandomRotation"}, {"type": "ColorJitter"}, {"type": "GaussianNoise"},
                   {"type": "MixUp"}], modality="image")
    x, y = _imgs(), np.arange(6) % 2
    a, b = aug(x, y, seed=5), aug(x, y, seed=5)
    assert torch.equal(a.output, b.output) and torch.equal(a.labels, b.labels) and a.ops == b.ops
    assert not torch.equal(a.output, aug(x, y, seed=6).output)
    with pytest.raises(DskError, match="MixUp mixes labels"):
        aug(x, None, seed=0)
    with pytest.raises(DskError, match=r"\[N, C, H, W\]"):
        aug(x[0], y, seed=0)


# ------------------------------------------------------------------ series


def _series(n=8, t=64, c=2):
    tt = np.linspace(0, 4 * np.pi, t)
    return np.stack([np.stack([np.sin(tt * (i + 1)), np.cos(tt)], -1)[:, :c] for i in range(n)]).astype(np.float32)


def test_time_warp_keeps_length_and_endpoints():
    x = _series()
    out, _ = aser.time_warp(x, np.random.default_rng(0), np.ones(8, bool), sigma=0.3, knots=4)
    assert out.shape == x.shape
    assert np.array_equal(out[:, 0], x[:, 0]) and np.array_equal(out[:, -1], x[:, -1])
    assert not np.allclose(out, x)


def test_series_ops_shapes_and_effects():
    x = _series()
    rng = np.random.default_rng(0)
    ones = np.ones(8, bool)
    out, _ = aser.jitter(x, rng, ones, sigma=0.1)
    assert out.shape == x.shape and 0.08 < (out - x).std() < 0.12
    out, d = aser.magnitude_scaling(x, rng, ones, sigma=0.2)
    assert np.allclose(out[0], x[0] * np.array(d[0]["factor"]), atol=1e-3)
    out, d = aser.window_slice(x, rng, ones, ratio=0.5)
    assert out.shape == x.shape
    s = d[0]["start"]
    assert out[0, 0, 0] == pytest.approx(x[0, s, 0]) and out[0, -1, 0] == pytest.approx(x[0, s + 31, 0])
    out, _ = aser.frequency_perturbation(x, rng, ones, band=[0.0, 1.0], amplitude=0.3, phase=0.3)
    assert out.shape == x.shape and not np.allclose(out, x)
    assert np.allclose(out.mean(1), x.mean(1), atol=1e-4)  # DC bin untouched
    out, _ = aser.frequency_perturbation(x, rng, ones, band=[0.0, 1.0], amplitude=0.0, phase=0.0)
    assert np.allclose(out, x, atol=1e-5)
    masked, _ = aser.jitter(x, rng, np.zeros(8, bool), sigma=1.0)
    assert np.array_equal(masked, x)


def test_series_determinism_and_2d_input():
    aug = compose(["Jitter", "MagnitudeScaling", "TimeWarp", "WindowSlice", "FrequencyPerturbation"], modality="series")
    x = _series()[:, :, 0]
    a = aug(x, seed=1)
    assert a.output.shape == x.shape
    assert np.array_equal(a.output, aug(x, seed=1).output)
    assert not np.array_equal(a.output, aug(x, seed=2).output)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("config, message", [
    ([{"type": "Rotate"}], "unknown op type 'Rotate'; valid: SynonymReplacement"),
    ([{"type": "RandomRotation", "params": {"angle": 3}}], "unknown param 'angle'; valid: degrees"),
    ([{"type": "RandomSwap", "params": {"rate": 1.5}}], r"rate=1.5 must be a number in \[0, 1\]"),
    ([{"type": "RandomDeletion", "params": {"rate": -0.1}}], r"must be a number in \[0, 1\]"),
    ([{"type": "EDA", "params": {"random_swap": 2}}], r"random_swap=2 must be a number in \[0, 1\]"),
    ([{"type": "Jitter", "p": 1.2}], r"p=1.2 must be a number in \[0, 1\]"),
    ([{"type": "Jitter", "prob": 1}], "unknown key 'prob'"),
    ([{"type": "Jitter"}, {"type": "MixUp"}], "mixes image and series ops"),
    ([], "non-empty list"),
])
def test_invalid_configs(config, message):
    with pytest.raises(DskError, match=message):
        parse_ops(config)


def test_modality_restricts_types():
    with pytest.raises(DskError, match="unknown text op type 'MixUp'; valid: SynonymReplacement"):
        parse_ops([{"type": "MixUp"}], modality="text")


def test_missing_synonym_source(tmp_path):
    with pytest.raises(DskError, match="synonym table .* not found"):
        compose([{"type": "SynonymReplacement"}], modality="text", synonyms=str(tmp_path / "nope.tsv"))
    # ops that need no synonyms do not need the table
    compose([{"type": "RandomSwap"}], modality="text", synonyms=str(tmp_path / "nope.tsv"))


def test_every_op_runs_with_defaults():
    x, y = _imgs(), np.arange(6) % 3
    for name, op in OPS.items():
        aug = compose([{"type": name}], modality=op.modality)
        if op.modality == "text":
            assert isinstance(aug(TEXT, seed=0).output, str)
        elif op.modality == "image":
            assert aug(x, y, seed=0).output.shape == x.shape
        else:
            assert aug(_series(), seed=0).output.shape == (8, 64, 2)
