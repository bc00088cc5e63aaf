"""`dsk augment` end to end: artifact layouts, provenance, cache hits and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsk.config import StageParams
from dsk.runtime import run_stage

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a good day for everyone.",
    "Happy people often run fast in the morning, and they rest in the evening.",
    "A big house stood near the old river; its owner was a kind and quiet man.",
    json.dumps({"messages": [{"role": "user", "content": "Why does the quick fox jump over the lazy dog?"},
                             {"role": "assistant", "content": "Because the dog is lazy."}]}),
]
EDA = '[{"type": "EDA", "params": {"synonym_replacement": 0.2, "random_insertion": 0.1, "random_swap": 0.1, "random_deletion": 0.1}}]'


def make_clean_artifact(docs=DOCS) -> str:
    """A stand-in for `dsk clean`'s text artifact: documents.parquet in the documented layout."""
    rows = [{"doc_id": i * 10, "text": t, "source": "sample.txt", "line": i + 1} for i, t in enumerate(docs)]

    def build(ctx):
        pq.write_table(pa.Table.from_pylist(rows), ctx.out / "documents.parquet")
        ctx.kind = "text"

    return run_stage(stage="clean", params=StageParams(), inputs=[], build=build).artifact.id


def artifact_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def run_json(cli, *args):
    code, out, err = cli("augment", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_text_end_to_end(cli, workspace):
    clean_id = make_clean_artifact()
    summary = run_json(cli, clean_id, "--copies", "2", "--ops", EDA)
    path = Path(summary["path"])
    assert artifact_files(path) == ["documents.parquet", "log.txt", "manifest.json", "rejects.parquet", "report.json"]
    assert summary["kind"] == "text"
    df = pq.read_table(path / "documents.parquet").to_pandas()
    assert list(df.columns) == ["doc_id", "text", "source", "line", "source_doc_id", "ops", "aug_seed", "variant"]
    originals = df[df.variant == 0]
    assert sorted(originals.doc_id) == [0, 10, 20, 30]
    assert (originals.source_doc_id == originals.doc_id).all() and originals.aug_seed.isna().all()
    assert originals.text.tolist() == DOCS
    variants = df[df.variant > 0]
    rejects = pq.read_table(path / "rejects.parquet").to_pandas()
    assert len(variants) + len(rejects) == 2 * len(DOCS)
    assert df.doc_id.is_unique
    for _, row in variants.iterrows():
        ops = json.loads(row["ops"])
        assert ops and ops[0]["type"] == "EDA"
        assert row["aug_seed"] >= 0 and row["source_doc_id"] in {0, 10, 20, 30}
        assert row["text"] != DOCS[row["source_doc_id"] // 10]
    # the chat example: only the user turn changed
    for text in df[df.source_doc_id == 30].text:
        assert json.loads(text)["messages"][1] == {"role": "assistant", "content": "Because the dog is lazy."}
    # each variant is reproducible from its recorded seed alone
    from dsk.data.augment_ops import compose

    aug = compose(json.loads(EDA), modality="text")
    row = variants.iloc[0]
    assert aug(DOCS[row["source_doc_id"] // 10], seed=int(row["aug_seed"])).output == row["text"]
    assert summary["metrics"]["n_original"] == 4 and summary["metrics"]["copies"] == 2


def test_text_cache_hit_and_seeded_determinism(cli, workspace):
    clean_id = make_clean_artifact()
    first = run_json(cli, clean_id, "--ops", EDA)
    again = run_json(cli, clean_id, "--ops", EDA)
    assert again["cached"] and again["id"] == first["id"]
    data = (Path(first["path"]) / "documents.parquet").read_bytes()
    forced = run_json(cli, clean_id, "--ops", EDA, "--force")
    assert not forced["cached"]
    assert (Path(forced["path"]) / "documents.parquet").read_bytes() == data
    other = run_json(cli, clean_id, "--ops", EDA, "--seed", "1")
    assert other["id"] != first["id"]
    texts = lambda s: pq.read_table(Path(s["path"]) / "documents.parquet").column("text").to_pylist()  # noqa: E731
    assert texts(other) != texts(first)


def test_ops_file_content_is_the_cache_key(cli, workspace, tmp_path):
    clean_id = make_clean_artifact()
    ops = tmp_path / "ops.yaml"
    ops.write_text("- {type: RandomSwap, params: {rate: 0.2}}\n")
    a = run_json(cli, clean_id, "--ops", str(ops))
    assert json.loads((Path(a["path"]) / "manifest.json").read_text())["params"]["ops"][0]["type"] == "RandomSwap"
    ops.write_text("- {type: RandomDeletion, params: {rate: 0.2}}\n")
    b = run_json(cli, clean_id, "--ops", str(ops))
    assert not b["cached"] and b["id"] != a["id"]


def test_images_end_to_end_with_mixes(cli, workspace, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "imgs.npz", x=x, y=y)
    ops = json.dumps([{"type": "RandomRotation", "params": {"degrees": 20}}, {"type": "HorizontalFlip", "p": 0.5},
                      {"type": "MixUp", "p": 0.5}, {"type": "CutMix", "p": 0.5}])
    summary = run_json(cli, str(tmp_path / "imgs.npz"), "--ops", ops, "--copies", "2", "--batch-size", "8")
    path = Path(summary["path"])
    assert artifact_files(path) == ["log.txt", "manifest.json", "provenance.parquet", "report.json", "x.npy", "y.npy"]
    xo, yo = np.load(path / "x.npy"), np.load(path / "y.npy")
    assert xo.shape == (60, 8, 8, 3) and xo.dtype == np.uint8
    assert np.array_equal(xo[:20], x)
    assert yo.shape == (60, 4) and np.allclose(yo.sum(1), 1.0)
    assert np.array_equal(yo[:20].argmax(1), y)
    prov = pq.read_table(path / "provenance.parquet").to_pandas()
    assert list(prov.columns) == ["index", "source_index", "variant", "ops", "aug_seed"]
    assert prov["index"].tolist() == list(range(60))
    assert prov.source_index.tolist() == list(range(20)) * 3
    partners = [op["partner"] for o in prov.ops for op in json.loads(o) if "partner" in op]
    assert partners and max(partners) >= 8  # batch-local partners were mapped to source indices
    again = run_json(cli, str(tmp_path / "imgs.npz"), "--ops", ops, "--copies", "2", "--batch-size", "8")
    assert again["cached"]


def test_png_folder_with_class_labels(cli, workspace, tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "pngs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / "pngs" / cls / f"{i}.png")
    summary = run_json(cli, str(tmp_path / "pngs"), "--ops", '[{"type": "CutMix"}]')
    path = Path(summary["path"])
    assert summary["metrics"]["classes"] == ["cat", "dog"]
    assert np.load(path / "x.npy").shape == (12, 6, 6)
    assert np.load(path / "y.npy").shape == (12, 2)


def test_series_end_to_end(cli, workspace, tmp_path):
    x = np.sin(np.linspace(0, 10, 50))[None, :, None] * np.ones((6, 1, 2))
    np.savez(tmp_path / "series.npz", x=x, y=np.arange(6))
    summary = run_json(cli, str(tmp_path / "series.npz"), "--modality", "series",
                       "--ops", '["Jitter", "TimeWarp", "WindowSlice", "FrequencyPerturbation"]')
    path = Path(summary["path"])
    assert artifact_files(path) == ["log.txt", "manifest.json", "provenance.parquet", "report.json", "x.npy", "y.npy"]
    xo = np.load(path / "x.npy")
    assert xo.shape == (12, 50, 2) and np.array_equal(xo[:6], x)
    assert np.load(path / "y.npy").tolist() == list(range(6)) * 2
    assert summary["kind"] == "series"


# ------------------------------------------------------------------ errors: exit 2, one line, no artifact


def _no_augment_artifact(workspace: Path) -> bool:
    return not (workspace / "artifacts" / "augment").exists() or not any((workspace / "artifacts" / "augment").iterdir())


@pytest.mark.parametrize("ops, message", [
    ('[{"type": "RandomSwap", "params": {"rate": 1.5}}]', "must be a number in [0, 1]"),
    ('[{"type": "Swap"}]', "unknown op type 'Swap'; valid:"),
    ('[{"type": "RandomSwap", "params": {"n": 1}}]', "unknown param 'n'; valid: rate"),
])
def test_bad_ops_rejected(cli, workspace, ops, message):
    clean_id = make_clean_artifact()
    code, out, err = cli("augment", clean_id, "--ops", ops)
    assert code == 2 and message in err and "Traceback" not in err
    assert _no_augment_artifact(workspace)


def test_missing_synonym_source(cli, workspace, tmp_path):
    clean_id = make_clean_artifact()
    code, _, err = cli("augment", clean_id, "--synonyms", str(tmp_path / "missing.tsv.gz"))
    assert code == 2 and "synonym table" in err and "not found" in err
    assert _no_augment_artifact(workspace)


def test_mixup_on_unlabeled_images(cli, workspace, tmp_path):
    np.save(tmp_path / "imgs.npy", np.zeros((4, 8, 8, 1), np.float32))
    code, _, err = cli("augment", str(tmp_path / "imgs.npy"), "--ops", '[{"type": "MixUp"}]')
    assert code == 2 and "MixUp mixes labels" in err
    assert _no_augment_artifact(workspace)


def test_wrong_image_rank(cli, workspace, tmp_path):
    np.save(tmp_path / "imgs.npy", np.zeros((4, 8), np.float32))
    code, _, err = cli("augment", str(tmp_path / "imgs.npy"), "--modality", "image")
    assert code == 2 and "images must be [N,H,W] or [N,H,W,C]" in err
    np.save(tmp_path / "amb.npy", np.zeros((4, 8, 8), np.float32))
    code, _, err = cli("augment", str(tmp_path / "amb.npy"))
    assert code == 2 and "--modality image or series" in err
    assert _no_augment_artifact(workspace)


def test_raw_text_and_missing_input(cli, workspace, tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    code, _, err = cli("augment", str(tmp_path / "t.txt"))
    assert code == 2 and "dsk clean" in err
    code, _, err = cli("augment")
    assert code == 2 and "run `dsk clean`" in err


def test_pipeline_file_validates_augment_step():
    from dsk.pipeline import load_pipeline

    repo = Path(__file__).resolve().parents[1]
    _, steps = load_pipeline(repo / "pipelines" / "default.yaml")
    aug = [s for s in steps if s.stage == "augment"]
    assert aug and aug[0].params.copies == 1
    rates = aug[0].params.ops[0]["params"]
    assert all(0 < r <= 0.1 for r in rates.values())


def test_unreadable_array_file(cli, workspace, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = cli("augment", str(tmp_path / "obj.npy"), "--modality", "image")
    assert code == 2 and "cannot read" in err and "Traceback" not in err
    assert _no_augment_artifact(workspace)


def test_image_bytes_reproducible_and_without_originals(cli, workspace, tmp_path):
    x = np.random.default_rng(1).random((10, 6, 6)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", x)
    args = (str(tmp_path / "imgs.npy"), "--modality", "image", "--ops",
            '[{"type": "RandomResizedCrop"}, {"type": "ColorJitter"}, {"type": "GaussianNoise"}]')
    first = run_json(cli, *args)
    data = (Path(first["path"]) / "x.npy").read_bytes()
    assert (Path(run_json(cli, *args, "--force")["path"]) / "x.npy").read_bytes() == data
    only = run_json(cli, *args, "--no-keep-originals", "--copies", "3")
    xo = np.load(Path(only["path"]) / "x.npy")
    assert xo.shape == (30, 6, 6) and xo.dtype == np.float32
    assert not any(np.array_equal(xo[i], x[i % 10]) for i in range(30))
    prov = pq.read_table(Path(only["path"]) / "provenance.parquet").to_pandas()
    assert sorted(set(prov.variant)) == [1, 2, 3] and prov.aug_seed.notna().all()
