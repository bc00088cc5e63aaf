"""`dsk tune`: a study over a stage's params; trials are artifacts; interruption and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import toystage
from dsk import registry
from dsk.artifacts import Store
from dsk.errors import DskError
from dsk.tune import load_override_file, parse_space, run_tune


@pytest.fixture
def toy(monkeypatch, workspace, tmp_path):
    monkeypatch.setitem(registry.BY_NAME, "toy", toystage.SPEC_RAW)
    import dsk.cli.common as common

    monkeypatch.setattr(common, "load_stage", toystage.as_module)
    raw = tmp_path / "raw.txt"
    raw.write_text("tune me\n")
    return raw


def test_three_trials_make_artifacts_and_a_best_override(toy, workspace):
    result = run_tune(stage="toy", space=["x=uniform:0:1"], trials=3, metric="loss", source=str(toy), prune=False)
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 3
    ids = {t["artifact_id"] for t in result["trials"]}
    store = Store.open()
    assert all(store.resolve(i).stage == "toy" for i in ids)
    best = result["best"]
    assert best["value"] == min(t["value"] for t in result["trials"])
    overrides = load_override_file(best["override_file"])
    assert overrides == [f"toy.x={yaml.safe_dump(best['params']['x']).splitlines()[0]}"]
    # rerunning the finished study does no new trials
    again = run_tune(stage="toy", space=["x=uniform:0:1"], trials=3, metric="loss", source=str(toy), prune=False)
    assert len(again["trials"]) == 3


def test_tpe_finds_the_minimum_region(toy):
    result = run_tune(stage="toy", space=["x=uniform:0:1"], trials=12, metric="loss", source=str(toy), prune=False)
    assert abs(result["best"]["params"]["x"] - 0.3) < 0.1


def test_interrupted_study_resumes(toy, workspace, tmp_path):
    hang_dir = tmp_path / "hang"
    script = (
        "import toystage, dsk.cli.common as c; from dsk import registry\n"
        "registry.BY_NAME['toy'] = toystage.SPEC_RAW; c.load_stage = toystage.as_module\n"
        "from dsk.tune import run_tune\n"
        f"run_tune(stage='toy', space=['x=uniform:0:1'], trials=3, metric='loss', source={str(toy)!r}, prune=False)\n"
    )
    env = {**os.environ, "TOY_HANG_DIR": str(hang_dir),
           "PYTHONPATH": os.pathsep.join([str(Path(toystage.__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 90
        while not (hang_dir / "hanging").exists():
            assert time.time() < deadline, "the second trial never started"
            assert proc.poll() is None, "the tune process ended early"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # one trial finished before the kill; the second was running
    result = run_tune(stage="toy", space=["x=uniform:0:1"], trials=3, metric="loss", source=str(toy), prune=False)
    states = [t["state"] for t in result["trials"]]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1
    failed = next(t for t in result["trials"] if t["state"] == "FAIL")
    retried = [t for t in result["trials"] if t["state"] == "COMPLETE" and t["params"] == failed["params"]]
    assert retried, "the interrupted trial's params were not run again"
    assert not any((workspace / "tmp").iterdir())


def test_pruning_stops_bad_trials(toy):
    result = run_tune(stage="toy", space=["x=uniform:0:1"], trials=10, metric="loss", source=str(toy), prune=True)
    states = {t["state"] for t in result["trials"]}
    assert "COMPLETE" in states
    assert states == {"COMPLETE", "PRUNED"}  # some trials were stopped early


@pytest.mark.parametrize("item, message", [
    ("lr=loguniform:0:1", "need 0 < LOW < HIGH"),
    ("nope=uniform:0:1", "unknown param 'nope'"),
    ("x=gauss:0:1", "KIND one of"),
    ("x=uniform:a:b", "two numbers"),
])
def test_bad_space_is_a_clear_error(item, message):
    with pytest.raises(DskError, match=message):
        parse_space([item], ["x", "lr"])
