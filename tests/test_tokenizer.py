"""dsk.data.tokenizer: training, exact round trips, chat formatting, save/load."""

from __future__ import annotations

import pytest

from dsk.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    min_vocab_size,
    train_bpe,
    train_char,
)
from dsk.errors import DskError

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "Café au lait, s'il vous plaît — naïve façade.",
    "日本語のテキストも大丈夫です。",
    "emoji 🙂🚀 and tabs\tand  double  spaces\n\n",
] * 20
HARD = ["héllo wörld", "日本語 🙂 ünïcödé", "  leading and trailing  ", "a\n\n\tb\r\nc", "", "<|endoftext|> is text"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer(train_bpe(CORPUS, vocab_size=320))


def test_bpe_round_trip_including_non_ascii(bpe):
    for text in CORPUS[:5] + HARD + ["ðŸ unseen bytes ☃ ∑ 𝔘"]:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.unk_id is None


def test_char_round_trip_and_unknown_characters():
    tok = Tokenizer(train_char(CORPUS))
    for text in CORPUS[:5]:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    ids = tok.encode("a☃b")  # ☃ never seen in training
    assert ids[1] == tok.unk_id and tok.decode([ids[0], ids[2]]) == "ab"


def test_special_tokens_fixed_ids_and_text_cannot_inject_them(bpe):
    assert bpe.special == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    ids = bpe.encode("<|endoftext|><|user|>")
    assert not set(ids) & set(bpe.special.values())


def test_format_chat_masks_only_assistant_content_and_end(bpe):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    ids, mask = bpe.format_chat(msgs, add_generation_prompt=False)
    assert len(ids) == len(mask)
    sp = bpe.special
    assert ids[0] == sp["bos"] and ids.count(sp["end"]) == 3
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == bpe.encode("Hello!") + [sp["end"]]
    ids2, mask2 = bpe.format_chat(msgs[:2], add_generation_prompt=True)
    assert ids2[-1] == sp["assistant"] and sum(mask2) == 0
    with pytest.raises(DskError, match="role"):
        bpe.format_chat([{"role": "robot", "content": "x"}])


def test_training_is_deterministic_and_save_load_keeps_behaviour(tmp_path, bpe):
    again = Tokenizer(train_bpe(CORPUS, vocab_size=320))
    assert again.hf.to_str() == bpe.hf.to_str()
    bpe.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)  # a directory holding tokenizer.json works too
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.encode_batch(HARD) == [bpe.encode(t) for t in HARD]
    from tokenizers import Tokenizer as HF  # the file is plain HF format
    assert HF.from_file(str(tmp_path / "tokenizer.json")).decode(bpe.encode("héllo")) == "héllo"


def test_vocab_too_small_for_special_tokens():
    with pytest.raises(DskError, match="too small"):
        train_bpe(CORPUS, vocab_size=min_vocab_size("bpe") - 1)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(DskError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_fast_ascii_path_gives_the_library_ids(bpe):
    """encode() takes a cached-regex path for ASCII text: it must equal `tokenizers` exactly."""
    import random

    assert bpe._fast_ascii
    rng = random.Random(0)
    pieces = [chr(i) for i in range(128)] + [" ", "  ", "\n\n", "'s", "'ll", "'re", "'ve", "'m", "'t", "'d",
                                               " word", "Word", "42", " 7", "\t", "--", "?!"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    texts += CORPUS[:5]
    library = [bpe.hf.encode(t, add_special_tokens=False).ids for t in texts]
    assert [bpe.encode(t) for t in texts] == library
    assert bpe.encode_batch(texts + HARD) == library + [bpe.hf.encode(t, add_special_tokens=False).ids for t in HARD]
    assert not Tokenizer(train_char(CORPUS))._fast_ascii
