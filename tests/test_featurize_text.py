"""`dsk featurize` on text: artifact layout, shards == direct encoding, split, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsk.artifacts import Store
from dsk.config import StageParams
from dsk.runtime import run_stage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "tinyshakespeare.txt"
FILES = ["log.txt", "manifest.json", "meta.json", "rejects.parquet", "report.json", "tokenizer.json",
         "train.bin", "train_offsets.npy", "val.bin", "val_offsets.npy"]


def sample_docs(n: int = 300) -> list[str]:
    paragraphs = [p for p in SAMPLE.read_text().split("\n\n") if p.strip()][:n]
    # make every document unique so that shard documents can be matched back to their text
    return [f"{p}\n— {i} ünïcödé" for i, p in enumerate(paragraphs)]


def make_text_artifact(docs, *, extra: dict | None = None, tag: str | None = None) -> str:
    """A clean-like text artifact (documents.parquet, the documented layout)."""
    def build(ctx):
        cols = {"doc_id": pa.array(range(len(docs)), pa.int64()), "text": pa.array(docs, pa.string()),
                "source": ["sample"] * len(docs), "line": pa.array([0] * len(docs), pa.int64())}
        cols.update(extra or {})
        pq.write_table(pa.table(cols), ctx.out / "documents.parquet")
        ctx.kind = "text"

    store = Store.open()
    params = StageParams()
    result = run_stage(stage="clean", params=params, inputs=[], build=build, store=store, kind="text",
                       stage_version=str(hash(tuple(docs))))
    if tag:
        store.tag(result.artifact.id, tag)
    return result.artifact.id


def featurize(cli, *args):
    code, out, err = cli("featurize", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def split_docs(path: Path, split: str, tok) -> list[str]:
    from dsk.data.shards import iter_documents

    docs = []
    for ids in iter_documents(path, split):
        assert ids[-1] == tok.eot_id and tok.eot_id not in ids[:-1]
        docs.append(tok.decode(ids[:-1]))
    return docs


def test_end_to_end_layout_and_shards_equal_direct_encoding(cli):
    from dsk.data.shards import open_split, read_meta, read_offsets
    from dsk.data.tokenizer import load_tokenizer

    docs = sample_docs()
    src = make_text_artifact(docs)
    summary = featurize(cli, src, "--vocab-size", "300", "--val-fraction", "0.1")
    path = Path(summary["path"])
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert summary["kind"] == "tokens"

    meta = read_meta(path)
    tok = load_tokenizer(path)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size <= 300
    assert meta["special_tokens"] == tok.special and set(tok.special) >= {"endoftext", "bos", "pad", "end"}
    from dsk.artifacts import sha256_file
    assert meta["tokenizer_sha256"] == sha256_file(path / "tokenizer.json")

    by_text = {t: i for i, t in enumerate(docs)}
    seen = []
    for split in ("train", "val"):
        tokens, offsets = open_split(path, split), read_offsets(path, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert meta[f"n_{split}_tokens"] == len(tokens)
        texts = split_docs(path, split, tok)
        assert meta[f"{split}_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        # the shard holds exactly the direct encoding of each document + end-of-text
        direct = np.concatenate([np.array(tok.hf.encode(t, add_special_tokens=False).ids + [tok.eot_id])
                                 for t in texts])
        assert np.array_equal(np.asarray(tokens), direct)
        seen.append({by_text[t] for t in texts})
    train, val = seen
    assert not train & val and train | val == set(range(len(docs)))
    assert len(val) == 30

    report = json.loads((path / "report.json").read_text())
    assert report["unknown_byte_rate_val"] == 0.0
    assert report["bytes_per_token_val"] > 1.2  # even 37 merges compress
    assert report["top_tokens"][0]["count"] >= report["top_tokens"][1]["count"] > 0
    assert summary["metrics"]["vocab_size"] == tok.vocab_size


def test_split_is_deterministic_and_seeded(cli):
    docs = sample_docs(120)
    src = make_text_artifact(docs)
    a = featurize(cli, src, "--tokenizer-type", "char", "--val-fraction", "0.2")
    b = featurize(cli, src, "--tokenizer-type", "char", "--val-fraction", "0.2", "--force")
    c = featurize(cli, src, "--tokenizer-type", "char", "--val-fraction", "0.2", "--seed", "1")
    assert a["id"] == b["id"] != c["id"]
    read = lambda s, name: (Path(s["path"]) / name).read_bytes()  # noqa: E731
    for name in ("val.bin", "train.bin", "tokenizer.json", "meta.json", "report.json"):
        assert read(a, name) == read(b, name)
    assert read(a, "val.bin") != read(c, "val.bin")


def test_augmented_copies_stay_with_their_source_document():
    from dsk.featurize.text import split_documents

    groups = np.repeat(np.arange(50), 3)  # 50 source documents, 3 augmented copies each
    val = split_documents(groups, 0.2, seed=0)
    assert val.sum() == 30
    for g in range(50):
        assert len(set(val[groups == g])) == 1
    assert np.array_equal(val, split_documents(groups, 0.2, seed=0))


def test_cache_hit(cli):
    src = make_text_artifact(sample_docs(60))
    first = featurize(cli, src, "--vocab-size", "280")
    second = featurize(cli, src, "--vocab-size", "280")
    assert not first["cached"] and second["cached"] and first["id"] == second["id"]


def test_reuse_tokenizer_keys_cache_on_the_tokenizer_artifact(cli, workspace):
    base = featurize(cli, make_text_artifact(sample_docs(80)), "--vocab-size", "300")
    Store.open().tag(base["id"], "base_tok")
    other = make_text_artifact(sample_docs(40)[::-1] + ["日本語の文書"])
    reused = featurize(cli, other, "--tokenizer", "base_tok")
    by_id = featurize(cli, other, "--tokenizer", base["id"])
    assert by_id["id"] == reused["id"] and by_id["cached"]
    base_path, reused_path = Path(base["path"]), Path(reused["path"])
    assert (base_path / "tokenizer.json").read_bytes() == (reused_path / "tokenizer.json").read_bytes()
    manifest = json.loads((reused_path / "manifest.json").read_text())
    assert manifest["params"]["tokenizer"] == base["id"]
    assert base["id"] in [i.get("id") for i in manifest["inputs"]]


def test_char_tokenizer_reports_unknown_bytes(cli):
    from dsk.data.shards import open_split

    base = featurize(cli, make_text_artifact(["abc abc", "cab"]), "--tokenizer-type", "char", "--val-fraction", "0")
    out = featurize(cli, make_text_artifact(["ab☃", "ba"] * 5), "--tokenizer", base["id"], "--val-fraction", "0")
    report = json.loads((Path(out["path"]) / "report.json").read_text())
    # 5 snowmen of 3 UTF-8 bytes each, out of 5 * (2 + 3) + 5 * 2 bytes
    assert report["unknown_byte_rate_train"] == pytest.approx(15 / 35)
    assert len(open_split(out["path"], "val")) == 0


def test_error_vocab_too_small(cli, workspace):
    src = make_text_artifact(sample_docs(10))
    code, out, err = cli("featurize", src, "--vocab-size", "100")
    assert code == 2 and "too small" in err and "Traceback" not in err
    assert not (workspace / "artifacts" / "featurize").exists()


def test_error_tokenizer_artifact_without_tokenizer(cli, workspace):
    src = make_text_artifact(sample_docs(10))
    code, out, err = cli("featurize", src, "--tokenizer", src)
    assert code == 2 and "no tokenizer.json" in err
    assert not (workspace / "artifacts" / "featurize").exists()


def test_worker_pool_writes_the_same_shards(tmp_path, monkeypatch):
    import dsk.featurize.text as text
    from dsk.data.tokenizer import Tokenizer, encode_pool, train_bpe
    from dsk.featurize.text import encode_split

    monkeypatch.setattr(text, "BATCH_BYTES", 20_000)  # many small batches: order must hold

    docs = sample_docs(200) + ["plain ascii"] * 5
    path = tmp_path / "tokenizer.json"
    Tokenizer(train_bpe(docs, vocab_size=300)).save(path)
    from dsk.data.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    one = encode_split(tmp_path / "a", tok, "train", docs, "uint16")
    pool = encode_pool(path, 2)
    try:
        two = encode_split(tmp_path / "b", tok, "train", docs, "uint16", pool=pool)
    finally:
        pool.shutdown()
    assert one["tokens"] == two["tokens"] and one["bytes"] == two["bytes"]
    for name in ("train.bin", "train_offsets.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
