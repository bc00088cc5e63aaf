"""End-to-end tests of `dsk clean`: exact artifact files, every input accounted for, cache, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clean_fixtures import document, edit_words, vocabulary
from conftest import SAMPLE

TEXT_FILES = {"documents.parquet", "rejects.parquet", "report.json", "manifest.json", "log.txt"}
TABLE_FILES = {"data.parquet", "rejects.parquet", "transform.json", "report.json", "manifest.json", "log.txt"}


def _artifact(out: str) -> Path:
    return Path(json.loads(out)["path"])


@pytest.fixture
def text_corpus(tmp_path):
    rng = random.Random(0)
    vocab = vocabulary()
    a = document(rng, vocab, 600)
    b = document(rng, vocab, 600)
    paragraphs = [
        a,                                            # 0 kept
        "Hi.",                                        # 1 too_few_words
        a.replace(" ", "  ") + "   ",                 # 2 exact duplicate of 0 after normalisation
        edit_words(rng, a, vocab, 1),                 # 3 near duplicate of 0
        b,                                            # 4 kept (unrelated)
        b.upper().replace(".", "!"),                  # 5 near duplicate of 4 (same words)
        "# tag # tag # tag # tag # tag",              # 6 symbol_ratio
        document(rng, vocab, 40),                     # 7 kept, short but prose
    ]
    d = tmp_path / "raw"
    d.mkdir()
    (d / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    lines = [json.dumps({"text": document(rng, vocab, 30) + " Write to ann@example.org today."}),
             "{not json",
             json.dumps({"title": "no text field"})]
    (d / "more.jsonl").write_text("\n".join(lines) + "\n")
    (d / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me and more words here today\n".encode("latin-1"))
    return d


def test_text_end_to_end_accounts_for_every_document(cli, text_corpus):
    code, out, err = cli("clean", str(text_corpus), "--pii", "--json")
    assert code == 0, err
    art = _artifact(out)
    assert {p.name for p in art.iterdir()} == TEXT_FILES
    docs = pd.read_parquet(art / "documents.parquet")
    rejects = pd.read_parquet(art / "rejects.parquet")
    report = json.loads((art / "report.json").read_text())
    assert list(docs.columns) == ["doc_id", "text", "source", "line"]
    assert str(docs["doc_id"].dtype) == "int64" and str(docs["line"].dtype) == "int64"
    assert len(docs) + len(rejects) == report["input_documents"] == 8 + 3 + 1
    assert sorted(docs["doc_id"].tolist() + rejects["doc_id"].tolist()) == list(range(12))

    # files are read in sorted order: corpus.txt (ids 0-7), latin1.txt (8), more.jsonl (9-11)
    reason = dict(zip(rejects["doc_id"], rejects["reason"]))
    assert reason == {1: "too_few_words", 2: "exact_duplicate", 3: "near_duplicate", 5: "near_duplicate",
                      6: "symbol_ratio", 10: "invalid_json", 11: "missing_text_field"}
    kept_of = dict(zip(rejects["doc_id"], rejects["kept_doc_id"]))
    assert kept_of[2] == 0 and kept_of[3] == 0 and kept_of[5] == 4 and kept_of[1] == -1
    assert set(docs["doc_id"]) == {0, 4, 7, 8, 9}
    by_id = docs.set_index("doc_id")
    assert "<EMAIL>" in by_id.at[9, "text"] and "ann@example.org" not in by_id.at[9, "text"]
    assert "\ufffd" in by_id.at[8, "text"]  # invalid UTF-8 is replaced and reported, not a crash
    assert by_id.at[3 if 3 in by_id.index else 4, "source"] == "corpus.txt"
    assert by_id.at[4, "line"] == 9  # paragraphs start at lines 1, 3, 5, 7, 9, ...
    assert report["pii_redactions"] == {"EMAIL": 1}
    assert report["files"]["latin1.txt"]["invalid_utf8_lines"] == 1
    assert report["duplicate_cluster_sizes"] == {"3": 1, "2": 1}
    assert "invalid UTF-8" in err


def test_text_cache_hit_and_same_bytes(cli, text_corpus):
    code, out1, _ = cli("clean", str(text_corpus), "--json", "--workers", "2")
    assert code == 0
    code, out2, _ = cli("clean", str(text_corpus), "--json", "--workers", "2")
    assert code == 0 and json.loads(out2)["cached"] is True
    art = _artifact(out1)
    first = (art / "documents.parquet").read_bytes()
    code, out3, _ = cli("clean", str(text_corpus), "--json", "--force", "--workers", "1")
    assert code == 0 and json.loads(out3)["cached"] is False
    assert (art / "documents.parquet").read_bytes() == first  # workers do not change the bytes


def test_simhash_verify_end_to_end(cli, text_corpus):
    code, out, err = cli("clean", str(text_corpus), "--simhash-k", "9", "--simhash-blocks", "12",
                         "--simhash-verify", "20", "--json")
    assert code == 0, err
    rejects = pd.read_parquet(_artifact(out) / "rejects.parquet")
    reason = dict(zip(rejects["doc_id"], rejects["reason"]))
    assert reason[3] == "near_duplicate" and reason[5] == "near_duplicate" and 4 not in reason and 7 not in reason


def test_minhash_method_end_to_end(cli, text_corpus):
    code, out, err = cli("clean", str(text_corpus), "--method", "minhash", "--shingle-size", "1", "--json")
    assert code == 0, err
    rejects = pd.read_parquet(_artifact(out) / "rejects.parquet")
    reason = dict(zip(rejects["doc_id"], rejects["reason"]))
    assert reason[3] == "near_duplicate" and reason[5] == "near_duplicate" and 4 not in reason


def test_tinyshakespeare_pipeline_step_keeps_95_percent(cli, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the pipeline's input path is repo-relative
    code, out, err = cli("run", "pipelines/default.yaml", "--until", "clean", "--json")
    assert code == 0, err
    step = json.loads(out)["steps"][0]
    assert step["stage"] == "clean" and step["kind"] == "text"
    assert step["metrics"]["kept_char_fraction"] >= 0.95
    docs = pd.read_parquet(Path(step["path"]) / "documents.parquet")
    assert len(docs) > 7000


def test_table_end_to_end(cli):
    code, out, err = cli("clean", str(SAMPLE / "breast_cancer.csv"), "--label", "diagnosis", "--json")
    assert code == 0, err
    art = _artifact(out)
    assert {p.name for p in art.iterdir()} == TABLE_FILES
    data = pd.read_parquet(art / "data.parquet")
    rejects = pd.read_parquet(art / "rejects.parquet")
    raw = pd.read_csv(SAMPLE / "breast_cancer.csv")
    assert len(data) + len(rejects) == len(raw)
    assert list(data.columns) == list(raw.columns)
    assert not data.isna().any().any()
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["kind"] == "table" and manifest["metrics"]["label_column"] == "diagnosis"
    assert set(rejects["_reason"]) <= {"duplicate_row", "outlier", "label_issue", "missing_label"}
    assert (rejects["_reason"] == "duplicate_row").sum() == int(raw.duplicated().sum())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{empty}"], "no documents"),
        (["{binary}"], "no documents"),
        (["{ragged}"], "ragged CSV: line 3"),
        (["{csv}", "--label", "nope"], "label column 'nope'"),
        (["{csv}", "--outlier-threshold", "-1"], "outlier_threshold"),
        (["{csv}", "--simhash-k", "9", "--simhash-blocks", "9"], "simhash_blocks"),
        (["{empty}", "--label", "x"], "--label applies to tables"),
        (["{missing}"], "does not exist"),
    ],
)
def test_errors_exit_2_one_line_nothing_written(cli, workspace, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (tmp_path / "ragged.csv").write_text("a,b,c\n1,2,3\n4,5,6,7\n")
    (tmp_path / "ok.csv").write_text("a,b\n1,2\n3,4\n")
    paths = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt", "ragged": tmp_path / "ragged.csv",
             "csv": tmp_path / "ok.csv", "missing": tmp_path / "nope.txt"}
    argv = [a.format(**paths) for a in args]
    before = {p: p.read_bytes() for p in paths.values() if p.exists()}
    code, out, err = cli("clean", *argv)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (workspace / "artifacts" / "clean").exists() or not any((workspace / "artifacts" / "clean").iterdir())
    assert {p: p.read_bytes() for p in before} == before


def test_parquet_kind_detection(cli, tmp_path):
    rng = random.Random(5)
    vocab = vocabulary()
    texts = [document(rng, vocab, 30) for _ in range(5)]
    pd.DataFrame({"body": texts + [texts[0]], "n": range(6)}).to_parquet(tmp_path / "docs.parquet")
    code, out, err = cli("clean", str(tmp_path / "docs.parquet"), "--text-field", "body", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["kind"] == "text" and summary["metrics"]["rejects_by_reason"] == {"exact_duplicate": 1}
    docs = pd.read_parquet(_artifact(out) / "documents.parquet")
    assert docs["line"].tolist() == [1, 2, 3, 4, 5]  # parquet rows, 1-based
    code, out, err = cli("clean", str(tmp_path / "docs.parquet"), "--json")  # no 'text' column: a table
    assert code == 0, err
    assert json.loads(out)["kind"] == "table"
