"""The artifact store and stage runtime: cache keys, --force, atomicity, lineage, tags, gc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toystage
from dsk import registry
from dsk.artifacts import Store, hash_raw_input
from dsk.errors import DskError


@pytest.fixture
def toy(monkeypatch, workspace):
    monkeypatch.setitem(registry.BY_NAME, "toy", toystage.SPEC_RAW)
    monkeypatch.setitem(registry.BY_NAME, "toynext", toystage.SPEC_NEXT)
    return toystage


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "raw.txt"
    p.write_text("hello world\n")
    return p


def run_toy(source=None, stage="toy", **params):
    return toystage.run(source=source, params=toystage.Params(**params), stage=stage)


def test_first_run_writes_artifact_with_manifest(toy, raw, workspace):
    res = run_toy(str(raw), n=2)
    assert not res.cached
    art = res.artifact
    assert art.path == workspace / "artifacts" / "toy" / art.id
    assert sorted(p.name for p in art.path.rglob("*") if p.is_file()) == [
        "count.txt", "log.txt", "manifest.json", "out.txt"]
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["stage"] == "toy" and m["id"] == art.id and m["kind"] == "text"
    assert m["params"] == {"n": 2, "note": "", "sleep": 0.0, "fail": False, "x": 0.0}
    assert m["inputs"][0]["type"] == "raw" and m["inputs"][0]["sha256"] == hash_raw_input(raw).sha256
    assert m["metrics"] == {"chars": 24, "loss": 0.09} and m["key_metric"] == "chars"
    assert {f["path"] for f in m["files"]} == {"out.txt", "sub/count.txt", "log.txt"}
    for key in ("dsk_version", "code_version", "seed", "started_at", "finished_at", "git_commit"):
        assert key in m
    assert Store.open().verify(art) == []


def test_second_run_is_cache_hit_and_does_no_work(toy, raw):
    first = run_toy(str(raw))
    mtime = (first.artifact.path / "manifest.json").stat().st_mtime_ns
    again = run_toy(str(raw))
    assert again.cached and again.artifact.id == first.artifact.id
    assert (again.artifact.path / "manifest.json").stat().st_mtime_ns == mtime


def test_param_input_and_seed_changes_give_new_ids(toy, raw):
    base = run_toy(str(raw)).artifact.id
    assert run_toy(str(raw), n=3).artifact.id != base
    assert run_toy(str(raw), note="x").artifact.id != base
    assert toystage.run(source=str(raw), seed=1).artifact.id != base
    raw.write_text("hello world, edited\n")
    assert run_toy(str(raw)).artifact.id != base


def test_same_content_elsewhere_gives_same_id(toy, raw, tmp_path):
    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    (copy_dir / raw.name).write_text(raw.read_text())
    assert run_toy(str(raw)).artifact.id == run_toy(str(copy_dir / raw.name)).artifact.id


def test_force_reruns_same_id(toy, raw):
    first = run_toy(str(raw))
    started = first.artifact.manifest["started_at"]
    time.sleep(0.01)
    forced = toystage.run(source=str(raw), force=True)
    assert not forced.cached and forced.artifact.id == first.artifact.id
    assert forced.artifact.manifest["started_at"] != started
    assert Store.open().verify(forced.artifact) == []


def test_injected_failure_leaves_no_partial_artifact(toy, raw, workspace):
    with pytest.raises(RuntimeError):
        run_toy(str(raw), fail=True)
    assert not (workspace / "artifacts" / "toy").exists() or not any((workspace / "artifacts" / "toy").iterdir())
    assert not any((workspace / "tmp").iterdir())


def test_kill_9_midway_leaves_no_partial_artifact(toy, raw, workspace, tmp_path):
    script = (
        "import toystage; from dsk import registry\n"
        "registry.BY_NAME['toy'] = toystage.SPEC_RAW\n"
        f"toystage.run(source={str(raw)!r}, params=toystage.Params(sleep=60))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(toystage.__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            staged = list((workspace / "tmp").glob("toy-*/out.txt")) if (workspace / "tmp").exists() else []
            if staged:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the stage never started writing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (workspace / "artifacts" / "toy").exists()
    assert len(list((workspace / "tmp").iterdir())) == 1  # the killed run's leftover
    # the next run cleans the leftover, and the store verifies
    run_toy(str(raw))
    assert [p.name for p in (workspace / "tmp").iterdir()] == []
    store = Store.open()
    assert all(store.verify(a) == [] for a in store.iter_artifacts())


def test_default_input_is_latest_upstream_and_lineage(toy, raw):
    first = run_toy(str(raw))
    second = run_toy(stage="toynext", n=2)
    assert second.artifact.input_ids == [first.artifact.id]
    store = Store.open()
    tree = store.lineage(second.artifact)
    assert tree["artifact"].id == second.artifact.id
    assert tree["inputs"][0]["artifact"].id == first.artifact.id
    assert tree["inputs"][0]["inputs"][0]["raw"]["sha256"] == hash_raw_input(raw).sha256


def test_latest_follows_cache_hits(toy, raw, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("other\n")
    a = run_toy(str(raw)).artifact
    b = run_toy(str(other)).artifact
    assert Store.open().latest("toy").id == b.id
    run_toy(str(raw))  # cache hit on a: it is the latest again
    assert Store.open().latest("toy").id == a.id


def test_resolve_by_prefix_tag_and_path(toy, raw):
    art = run_toy(str(raw)).artifact
    store = Store.open()
    assert store.resolve(art.id[:6]).id == art.id
    store.tag(art.id, "best")
    assert store.resolve("best").id == art.id
    assert store.resolve(str(art.path)).id == art.id
    assert store.resolve("toy:latest").id == art.id
    with pytest.raises(DskError, match="no artifact matches"):
        store.resolve("ffffffffffff")


def test_gc_keeps_tagged_chains_and_latest(toy, raw, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("other\n")
    kept_root = run_toy(str(raw)).artifact
    kept_child = run_toy(stage="toynext").artifact
    Store.open().tag(kept_child.id, "keep")
    doomed = run_toy(str(raw), n=5).artifact  # superseded below, untagged
    latest_root = run_toy(str(other)).artifact
    latest_child = run_toy(stage="toynext", n=3).artifact
    store = Store.open()
    dry = store.gc(dry_run=True)
    assert [a.id for a in dry] == [doomed.id]
    assert doomed.path.exists()
    removed = store.gc()
    assert [a.id for a in removed] == [doomed.id]
    assert not doomed.path.exists()
    for art in (kept_root, kept_child, latest_root, latest_child):
        assert art.path.exists()


def test_verify_detects_tampering(toy, raw):
    art = run_toy(str(raw)).artifact
    (art.path / "out.txt").write_text("tampered")
    problems = Store.open().verify(art)
    assert problems and "out.txt" in problems[0]
    (art.path / "extra.bin").write_bytes(b"x")
    assert any("extra.bin: not in manifest" in p for p in Store.open().verify(art))


def test_missing_and_empty_inputs_are_clear_errors(toy, tmp_path, workspace):
    with pytest.raises(DskError, match="does not exist"):
        run_toy(str(tmp_path / "nope" / "x.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DskError, match="is empty"):
        run_toy(str(empty))
    with pytest.raises(DskError, match="run `dsk toy` first"):
        run_toy(stage="toynext")
    assert not (workspace / "artifacts").exists() or not any((workspace / "artifacts").rglob("manifest.json"))


def test_build_error_leaves_nothing(toy, tmp_path, workspace):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(DskError, match="has no text"):
        run_toy(str(blank))
    assert not any((workspace / "artifacts").rglob("manifest.json"))
    assert not any((workspace / "tmp").iterdir())


def test_unwritable_workspace(toy, raw, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DSK_HOME", str(blocker / "ws"))
    with pytest.raises(DskError, match="not writable"):
        run_toy(str(raw))


def test_corrupt_manifest_is_a_clear_error(toy, raw):
    art = run_toy(str(raw)).artifact
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(DskError, match="corrupt manifest"):
        Store.open().resolve(art.id)
