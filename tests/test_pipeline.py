"""Pipeline files: validation before anything runs, the runner, --set and --until."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import toystage
from dsk import registry
from dsk.errors import DskError
from dsk.pipeline import load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(monkeypatch, workspace):
    monkeypatch.setitem(registry.BY_NAME, "toy", toystage.SPEC_RAW)
    monkeypatch.setitem(registry.BY_NAME, "toynext", toystage.SPEC_NEXT)
    import dsk.cli.common as common

    real = common.load_stage
    monkeypatch.setattr(common, "load_stage", lambda s: toystage.as_module(s) if s.startswith("toy") else real(s))
    return toystage


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "raw.txt"
    p.write_text("some text\n")
    return p


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(text)
    return p


def two_steps(raw) -> str:
    return f"""
name: t
seed: 0
steps:
  - stage: toy
    input: {raw}
    params: {{n: 2}}
  - stage: toy
    name: again
    params: {{n: 3}}
"""


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path, workspace):
    doc, steps = load_pipeline(path)
    assert doc["steps"] is not None
    for step in steps:
        assert registry.BY_NAME[step.stage].implemented


def test_runs_steps_in_order_then_caches(toy, raw, tmp_path):
    pipe = write(tmp_path, two_steps(raw))
    first = run_pipeline(pipe)
    assert [r["step"] for r in first["steps"]] == ["toy", "again"]
    assert [r["cached"] for r in first["steps"]] == [False, False]
    # the second step read the first step's output: 'some text\n' * 2 * 3
    assert first["steps"][1]["metrics"]["chars"] == 60
    second = run_pipeline(pipe)
    assert [r["cached"] for r in second["steps"]] == [True, True]
    assert [r["id"] for r in second["steps"]] == [r["id"] for r in first["steps"]]


def test_set_override_changes_only_that_step_and_after(toy, raw, tmp_path):
    pipe = write(tmp_path, two_steps(raw))
    base = run_pipeline(pipe)
    changed = run_pipeline(pipe, overrides=["again.n=4"])
    assert changed["steps"][0]["cached"] and changed["steps"][0]["id"] == base["steps"][0]["id"]
    assert not changed["steps"][1]["cached"]
    assert changed["steps"][1]["metrics"]["chars"] == 80


def test_until_stops_early(toy, raw, tmp_path):
    report = run_pipeline(write(tmp_path, two_steps(raw)), until="toy")
    assert [r["step"] for r in report["steps"]] == ["toy"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("steps:\n  - stage: toy\n    params: {nn: 1}\n", "unknown key 'nn'; allowed: n, note, sleep, fail, x"),
        ("steps:\n  - stage: toy\n    params: {n: abc}\n", "n='abc'"),
        ("steps:\n  - stage: toy\n    params: {n: 0}\n", "greater than or equal to 1"),
        ("steps:\n  - stage: nosuch\n", "unknown stage 'nosuch'"),
        ("steps:\n  - stage: toy\n    colour: red\n", "unknown key 'colour'"),
        ("steps:\n  - stage: toy\n  - stage: toy\n", "duplicate step name 'toy'"),
        ("steps:\n  - stage: toy\n    from: later\n", "'from: later' names no earlier step"),
        ("steps: [\n", "not valid YAML"),
        ("stages: []\n", "expected a mapping with a 'steps' list"),
    ],
)
def test_validation_errors_name_file_and_key(toy, tmp_path, body, message):
    pipe = write(tmp_path, body)
    with pytest.raises(DskError) as exc:
        load_pipeline(pipe)
    assert message in str(exc.value)
    assert str(pipe) in str(exc.value)


def test_validation_happens_before_anything_runs(toy, raw, tmp_path, workspace):
    pipe = write(tmp_path, two_steps(raw) + "  - stage: toy\n    name: bad\n    params: {n: -1}\n")
    with pytest.raises(DskError, match="step 'bad'"):
        run_pipeline(pipe)
    assert not (workspace / "artifacts").exists()


def test_set_errors(toy, raw, tmp_path):
    pipe = write(tmp_path, two_steps(raw))
    with pytest.raises(DskError, match="no step named 'nosuch'"):
        load_pipeline(pipe, ["nosuch.n=2"])
    with pytest.raises(DskError, match="expected STEP.param=value"):
        load_pipeline(pipe, ["n=2"])
    with pytest.raises(DskError, match="unknown key 'zz'"):
        load_pipeline(pipe, ["again.zz=2"])


def test_missing_pipeline_file(cli, tmp_path):
    code, _, err = cli("run", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_run_cli_json_summary(toy, raw, tmp_path, cli):
    pipe = write(tmp_path, two_steps(raw))
    code, out, err = cli("run", pipe, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["stage"] for r in report["steps"]] == ["toy", "toy"]


def test_not_implemented_stage_is_rejected(toy, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setitem(registry.BY_NAME, "report", dataclasses.replace(registry.BY_NAME["report"], implemented=False))
    with pytest.raises(DskError, match="stage 'report' is not implemented yet"):
        load_pipeline(write(tmp_path, "steps:\n  - stage: report\n"))


def test_model_level_validator_errors_are_one_line():
    from pydantic import model_validator

    from dsk.config import StageParams, build_params

    class Pair(StageParams):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def ordered(self):
            if self.low >= self.high:
                raise ValueError("low must be below high")
            return self

    with pytest.raises(DskError, match="low must be below high"):
        build_params(Pair, {"low": 3, "high": 2}, where="x")
