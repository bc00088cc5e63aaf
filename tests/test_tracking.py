"""`--mlflow`: a stage run is logged to MLflow with its params, metrics and artifact id."""

from __future__ import annotations

import json

import toystage
from dsk import registry, tracking


def test_stage_run_is_logged_to_mlflow(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BY_NAME, "toy", toystage.SPEC_RAW)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tmp_path / "raw.txt"
    raw.write_text("track me\n")
    tracking.enable_mlflow()
    try:
        art = toystage.run(source=str(raw), params=toystage.Params(n=3)).artifact
    finally:
        tracking.enable_mlflow(False)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dsk"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["dsk.id"] == art.id and run.data.tags["dsk.stage"] == "toy"
    assert run.data.params["n"] == "3"
    assert run.data.metrics["chars"] == 27.0


def test_without_mlflow_nothing_is_imported(workspace, tmp_path, monkeypatch):
    import subprocess
    import sys

    code = ("import sys, toystage; from dsk import registry; registry.BY_NAME['toy'] = toystage.SPEC_RAW\n"
            f"toystage.run(source={str(tmp_path / 'r.txt')!r})\n"
            "print(json.dumps('mlflow' in sys.modules))")
    (tmp_path / "r.txt").write_text("x")
    env = {"PYTHONPATH": str(toystage.__file__).rsplit("/", 1)[0], "DSK_HOME": str(workspace),
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
