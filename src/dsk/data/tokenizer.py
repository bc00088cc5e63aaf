"""Tokenizers shared by featurize, pretrain, finetune and serve: training, loading, chat format.

A tokenizer is a Hugging Face `tokenizers` ``tokenizer.json``. Two kinds are trained here:

* byte-level BPE (GPT-2 style pre-tokenization): every string round-trips exactly, so there
  are no unknown bytes;
* character-level: one token per character seen in training plus an ``<|unk|>`` token, for
  comparisons with character-level baselines (nanoGPT's shakespeare_char).

Both carry the same special tokens (:data:`SPECIAL_TOKENS`). Plain text is always encoded
with special-token matching turned off, so a document that happens to contain the string
``<|endoftext|>`` cannot inject a control token; control tokens only come from
:meth:`Tokenizer.format_chat` and the end-of-text id that the shards append.

    $ dsk featurize --vocab-size 1024
    >>> from dsk.data.tokenizer import load_tokenizer
    >>> tok = load_tokenizer(".dsk/artifacts/featurize/<id>")     # dir or tokenizer.json
    >>> ids, mask = tok.format_chat([{"role": "user", "content": "hi"},
    ...                              {"role": "assistant", "content": "hello"}])
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dsk.errors import DskError

# name -> token string; the order fixes the ids (0..6) of a freshly trained tokenizer
SPECIAL_TOKENS: dict[str, str] = {
    "endoftext": "<|endoftext|>",  # document separator, appended after every document
    "bos": "<|bos|>",              # start of a chat transcript
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",              # end of one chat turn
}
UNK_TOKEN = "<|unk|>"  # character-level tokenizers only
CHAT_ROLES = ("system", "user", "assistant")
N_BYTES = 256

# GPT-2's pre-tokenizer regex (what `pre_tokenizers.ByteLevel` runs) restricted to ASCII text,
# where \p{L} is [A-Za-z], \p{N} is [0-9] and \s is tab..CR and space (Oniguruma does not count 0x1C-0x1F)
_WS = r"\t\n\x0b\x0c\r "
_ASCII_PRETOKEN = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
_WORD_CACHE_LIMIT = 1 << 20


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_CHARS = _bytes_to_unicode()


def min_vocab_size(kind: str) -> int:
    """Smallest vocabulary a tokenizer of ``kind`` can have: the 256 bytes + special tokens."""
    if kind == "bpe":
        return N_BYTES + len(SPECIAL_TOKENS)
    return len(SPECIAL_TOKENS) + 2  # char-level: specials, <|unk|> and at least one character


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
              length: int | None = None) -> "tokenizers.Tokenizer":  # noqa: F821
    """Train a byte-level BPE tokenizer on ``texts``; deterministic for the same texts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < min_vocab_size("bpe"):
        raise DskError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {N_BYTES} byte tokens + "
            f"{len(SPECIAL_TOKENS)} special tokens; use --vocab-size {min_vocab_size('bpe')} or more"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def train_char(texts: Iterable[str]) -> "tokenizers.Tokenizer":  # noqa: F821
    """A character-level tokenizer: specials, ``<|unk|>``, then every character seen, sorted.

    Built as a `tokenizers` BPE model with no merges and no pre-tokenizer, so it is a plain
    ``tokenizer.json`` that ``tokenizers.Tokenizer.from_file`` (and :func:`load_tokenizer`)
    loads like any other; unseen characters map to ``<|unk|>`` one by one.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    fixed = [*SPECIAL_TOKENS.values(), UNK_TOKEN]
    vocab = {token: i for i, token in enumerate(fixed)}
    for ch in sorted(chars - set(fixed)):
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the project's conventions.

    ``encode``/``encode_batch`` never produce special ids from text; ``special`` maps the
    names of :data:`SPECIAL_TOKENS` to ids; ``format_chat`` builds a chat transcript.
    """

    def __init__(self, hf: "tokenizers.Tokenizer", *, sha256: str | None = None):  # noqa: F821
        self.hf = hf
        # text is data, never control: "<|endoftext|>" typed in a document stays text
        self.hf.encode_special_tokens = True
        self.sha256 = sha256 or hashlib.sha256(hf.to_str().encode()).hexdigest()
        self.special: dict[str, int] = {}
        for name, token in SPECIAL_TOKENS.items():
            idx = hf.token_to_id(token)
            if idx is not None:
                self.special[name] = idx
        self.unk_id: int | None = hf.token_to_id(UNK_TOKEN)
        self._fast_ascii = _is_plain_byte_level_bpe(hf)
        self._word_cache: dict[str, list[int]] = {}
        missing = [SPECIAL_TOKENS[n] for n in ("endoftext",) if n not in self.special]
        if missing:
            raise DskError(f"tokenizer has no {missing[0]} token; train one with `dsk featurize`")

    # ---- basics
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self.special["endoftext"]

    @property
    def bos_id(self) -> int | None:
        return self.special.get("bos")

    @property
    def pad_id(self) -> int | None:
        return self.special.get("pad")

    @property
    def end_id(self) -> int | None:
        return self.special.get("end")

    @property
    def kind(self) -> str:
        return "char" if self.unk_id is not None and self.hf.pre_tokenizer is None else "bpe"

    def encode(self, text: str) -> list[int]:
        if self._fast_ascii and text.isascii():
            return self._encode_ascii(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the batch over all cores.

        ASCII texts under a plain byte-level BPE take :meth:`_encode_ascii`, which gives the
        same ids ~3x faster (tests/test_tokenizer.py checks the equality).
        """
        texts = list(texts)
        if not self._fast_ascii:
            return [e.ids for e in self._encode_batch(texts)]
        out: list[list[int] | None] = [None] * len(texts)
        rest = []
        for i, text in enumerate(texts):
            if text.isascii():
                out[i] = self._encode_ascii(text)
            else:
                rest.append(i)
        if rest:
            for i, enc in zip(rest, self._encode_batch([texts[i] for i in rest])):
                out[i] = enc.ids
        return out  # type: ignore[return-value]

    def _encode_ascii(self, text: str) -> list[int]:
        """Pre-tokenize with the ASCII form of GPT-2's regex, then look each piece up in a cache.

        Written here, not taken from `tokenizers`, because it is measurably faster: on natural
        text a few thousand distinct pieces cover almost everything, so a dict lookup replaces
        the library's per-byte alignment bookkeeping (benchmarks/featurize_encode.py). A cache
        miss runs the library's own BPE model on the piece, so the ids are the library's.
        """
        cache = self._word_cache
        ids: list[int] = []
        for piece in _ASCII_PRETOKEN.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                mapped = "".join(_BYTE_CHARS[b] for b in piece.encode("ascii"))
                piece_ids = [t.id for t in self.hf.model.tokenize(mapped)]
                if len(cache) < _WORD_CACHE_LIMIT:
                    cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def _encode_batch(self, texts: list[str]):
        # encode_batch, not encode_batch_fast: on tokenizers 0.23 the "fast" variant measured
        # slower here (0.8-1.2 vs 1.6 MB/s on the same shared 2-core box)
        return self.hf.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_text(self, idx: int) -> str:
        """A token as text for humans (bytes that are not whole characters show as �)."""
        return self.hf.decode([int(idx)], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.hf.encode_special_tokens = False  # the file stays the plain HF format
        try:
            self.hf.save(str(path))
        finally:
            self.hf.encode_special_tokens = True

    # ---- chat
    def format_chat(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of a chat transcript and a mask that is 1 where the assistant speaks.

        Layout: ``<|bos|>`` then, per message, ``<|role|> content <|end|>``; with
        ``add_generation_prompt`` a final ``<|assistant|>`` asks the model to answer. The mask
        covers each assistant message's content and its ``<|end|>`` (so a finetuned model
        learns to stop), never the role tokens or other turns.
        """
        missing = [n for n in ("bos", "end", *CHAT_ROLES) if n not in self.special]
        if missing:
            raise DskError(f"tokenizer has no {SPECIAL_TOKENS[missing[0]]} token; it cannot format chats")
        ids = [self.special["bos"]]
        mask = [0]
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise DskError(f"chat message {i}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise DskError(f"chat message {i}: content must be a string")
            body = self.encode(content) + [self.special["end"]]
            ids += [self.special[role]] + body
            mask += [0] + [1 if role == "assistant" else 0] * len(body)
        if add_generation_prompt:
            ids.append(self.special["assistant"])
            mask.append(0)
        return ids, mask


def _is_plain_byte_level_bpe(hf) -> bool:
    """True when ``hf`` is exactly GPT-2-style byte-level BPE (what :func:`train_bpe` builds)."""
    from tokenizers import models, pre_tokenizers

    pre = hf.pre_tokenizer
    return (
        isinstance(hf.model, models.BPE)
        and hf.model.dropout is None
        and not getattr(hf.model, "byte_fallback", False)
        and hf.normalizer is None
        and isinstance(pre, pre_tokenizers.ByteLevel)
        and not pre.add_prefix_space
        and getattr(pre, "use_regex", True)
    )


# ---- process pool: the ASCII fast path is Python, so a second core needs a second process
_POOL_TOKENIZER: Tokenizer | None = None


def _pool_init(path: str) -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _POOL_TOKENIZER
    _POOL_TOKENIZER = load_tokenizer(path)


def _pool_encode(job: tuple[list[str], str]):
    from dsk.data.shards import flatten_documents

    texts, dtype = job
    assert _POOL_TOKENIZER is not None
    return flatten_documents(_POOL_TOKENIZER.encode_batch(texts), _POOL_TOKENIZER.eot_id, dtype)


def encode_pool(tokenizer_path: str | Path, workers: int):
    """Worker processes (spawned, so no fork-with-threads hazards) that each load the tokenizer.

    ``pool.map(_pool_encode, [(texts, dtype), ...])`` yields ``flatten_documents`` results in order.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_pool_init, initargs=(str(tokenizer_path),))


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/tokenizer.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DskError(f"no tokenizer at {str(path)!r}: expected a tokenizer.json or a featurize artifact")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (or the one inside an artifact directory)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = tokenizer_file(path)
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise DskError(f"cannot read tokenizer {str(p)!r}: {str(exc).splitlines()[0]}") from None
    return Tokenizer(hf, sha256=hashlib.sha256(p.read_bytes()).hexdigest())


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
