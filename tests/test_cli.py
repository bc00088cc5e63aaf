"""The command line: --help lists every stage in order, errors are one line with exit code 2."""

from __future__ import annotations

import json
import re

import pytest
import typer

import toystage
from dsk import registry
from dsk.registry import LIFECYCLE

# Stages whose command exists but exits 2 with "not implemented yet". Update this list as
# stages land, so nobody mistakes a placeholder for a working stage.
NOT_IMPLEMENTED = ["clean", "augment", "quantize", "export", "serve", "eval", "report"]


def test_help_lists_every_stage_in_lifecycle_order(cli):
    code, out, err = cli("--help")
    text = out + err
    assert code == 0
    positions = [re.search(rf"^\W*{name}\s{{2,}}\S", text, re.M) for name in LIFECYCLE]
    assert all(positions), [n for n, p in zip(LIFECYCLE, positions) if not p]
    starts = [p.start() for p in positions]
    assert starts == sorted(starts)
    for extra in ("train", "run", "eval", "report", "ls", "show", "lineage", "verify", "tag", "gc"):
        assert re.search(rf"^\W*{extra}\s{{2,}}\S", text, re.M), extra


def test_not_implemented_list_is_current():
    assert registry.not_implemented() == NOT_IMPLEMENTED


@pytest.mark.parametrize("stage", NOT_IMPLEMENTED)
def test_not_implemented_stages_exit_2(cli, stage):
    code, out, err = cli(stage)
    assert code == 2
    assert "not implemented yet" in err
    assert "Traceback" not in err


def test_every_stage_has_help(cli):
    for stage in LIFECYCLE:
        code, out, err = cli(stage, "--help")
        assert code == 0, stage
        assert "--seed" in out + err and "--json" in out + err


def test_train_alias_rejects_unknown_stage(cli):
    code, _, err = cli("train", "--stage", "nonsense")
    assert code == 2 and "--stage must be one of pretrain, finetune" in err


def test_unknown_artifact_is_one_line_error(cli):
    code, out, err = cli("show", "deadbeef0000")
    assert code == 2
    assert err.strip() == "error: no artifact matches 'deadbeef0000'; list them with `dsk ls`"


def test_debug_env_shows_traceback(cli, monkeypatch):
    from dsk.errors import DskError

    monkeypatch.setenv("DSK_DEBUG", "1")
    with pytest.raises(DskError):
        cli("show", "deadbeef0000")


def test_unknown_command_exits_2(cli):
    code, _, err = cli("frobnicate")
    assert code == 2


# ---- the generated stage command, through a toy stage


@pytest.fixture
def toy_cli(monkeypatch, workspace):
    monkeypatch.setitem(registry.BY_NAME, "toy", toystage.SPEC_RAW)
    monkeypatch.setitem(registry.BY_NAME, "toynext", toystage.SPEC_NEXT)
    from dsk.cli.common import stage_command
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("toy")(stage_command("toy"))
    app.command("toynext")(stage_command("toynext"))
    runner = CliRunner()

    def invoke(*args):
        from dsk.cli.main import main as _unused  # noqa: F401 (ensures CLI modules import)
        import dsk.cli.common as common

        monkeypatch.setattr(common, "load_stage", toystage.as_module)
        result = runner.invoke(app, [str(a) for a in args])
        return result

    return invoke


def test_stage_command_runs_and_caches(toy_cli, tmp_path, workspace):
    raw = tmp_path / "in.txt"
    raw.write_text("abc")
    r1 = toy_cli("toy", raw, "--n", "2", "--json")
    assert r1.exit_code == 0, r1.output
    s1 = json.loads(r1.stdout)
    assert s1["cached"] is False and s1["metrics"]["chars"] == 6
    r2 = toy_cli("toy", raw, "--set", "n=2", "--json")
    s2 = json.loads(r2.stdout)
    assert s2["cached"] is True and s2["id"] == s1["id"]


def test_stage_command_validates_options(toy_cli, tmp_path):
    raw = tmp_path / "in.txt"
    raw.write_text("abc")
    r = toy_cli("toy", raw, "--set", "nn=2")
    assert isinstance(r.exception, Exception) and "unknown key 'nn'" in str(r.exception)
    r = toy_cli("toy", raw, "--set", "n=500")
    assert "n=500" in str(r.exception) and "less than or equal to 100" in str(r.exception)


def test_help_shows_param_descriptions(toy_cli):
    r = toy_cli("toy", "--help")
    assert "How many times to repeat the input." in r.output


def test_artifact_commands_end_to_end(toy_cli, cli, tmp_path, workspace):
    raw = tmp_path / "in.txt"
    raw.write_text("abc")
    first = json.loads(toy_cli("toy", raw, "--json").stdout)
    second = json.loads(toy_cli("toynext", "--json").stdout)
    code, out, _ = cli("ls", "--json")
    listed = json.loads(out)
    assert code == 0 and {a["id"] for a in listed} == {first["id"], second["id"]}
    code, out, _ = cli("show", second["id"][:6], "--json")
    assert code == 0 and json.loads(out)["inputs"][0]["id"] == first["id"]
    code, out, _ = cli("lineage", second["id"], "--json")
    tree = json.loads(out)
    assert tree["inputs"][0]["id"] == first["id"] and tree["inputs"][0]["inputs"][0]["type"] == "raw"
    code, _, _ = cli("tag", first["id"], "golden")
    assert code == 0
    code, out, _ = cli("gc", "--dry-run", "--json")
    assert json.loads(out)["removed"] == []
    code, out, _ = cli("verify", "--json")
    assert code == 0 and json.loads(out)["failed"] == {}
    (workspace / "artifacts" / "toy" / first["id"] / "out.txt").write_text("changed")
    code, out, _ = cli("verify", "--json")
    assert code == 1 and list(json.loads(out)["failed"]) == [f"toy/{first['id']}"]


def test_corrupt_manifest_cli(toy_cli, cli, tmp_path, workspace):
    raw = tmp_path / "in.txt"
    raw.write_text("abc")
    aid = json.loads(toy_cli("toy", raw, "--json").stdout)["id"]
    (workspace / "artifacts" / "toy" / aid / "manifest.json").write_text("garbage")
    code, _, err = cli("show", aid)
    assert code == 2 and "corrupt manifest" in err and len(err.strip().splitlines()) == 1
    code, _, _ = cli("verify")
    assert code == 1


def test_unwritable_workspace_cli(toy_cli, tmp_path, monkeypatch):
    raw = tmp_path / "in.txt"
    raw.write_text("abc")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("DSK_HOME", str(blocker / "ws"))
    r = toy_cli("toy", raw)
    assert "not writable" in str(r.exception)
