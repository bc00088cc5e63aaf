"""Shared fixtures: every test runs in a fresh workspace (DSK_HOME) inside a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh, empty dsk workspace; the cwd is a temp dir too."""
    home = tmp_path / "dskhome"
    monkeypatch.setenv("DSK_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSK_DEBUG", raising=False)
    return home


@pytest.fixture
def cli(workspace):
    """Run the dsk CLI in-process: returns (exit_code, stdout, stderr)."""
    import io
    import contextlib

    from dsk import console
    from dsk.cli.main import main

    def invoke(*args: str):
        out, err = io.StringIO(), io.StringIO()
        old_file = console.console.file
        console.console.file = err
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        finally:
            console.console.file = old_file
            console.set_mode()
        return code, out.getvalue(), err.getvalue()

    return invoke


@pytest.fixture(autouse=True)
def _threads():
    # two cores: keep torch from oversubscribing when several test processes run
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
