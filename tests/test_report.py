"""`dsk report`: a self-contained HTML file over a lineage, checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dsk.artifacts import Store, hash_raw_input
from dsk.config import StageParams
from dsk.runtime import run_stage


def _clean_like(ctx):
    (ctx.out / "report.json").write_text(json.dumps(
        {"input_documents": 10, "kept_documents": 7, "rejected_by_reason": {"exact_duplicate": 2, "too_short": 1}}))
    ctx.kind = "text"
    ctx.metrics = {"kept_documents": 7}
    ctx.key_metric = "kept_documents"


def _train_like(ctx):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"step": s, "loss": 5 - s * 0.1, "lr": 1e-3, "val_bpb": 3 - s * 0.05,
             "expert_load": [[0.2, 0.3, 0.25, 0.25], [0.1, 0.4, 0.3, 0.2]]} for s in range(10)]
    (ctx.out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    fig.savefig(ctx.out / "curves.png")
    plt.close(fig)
    ctx.kind = "model"
    ctx.metrics = {"val_bpb": 2.55}
    ctx.key_metric = "val_bpb"


@pytest.fixture
def lineage(workspace, tmp_path):
    raw = tmp_path / "corpus.txt"
    raw.write_text("some text")
    store = Store.open()
    a = run_stage(stage="clean", params=StageParams(), inputs=[hash_raw_input(raw)], build=_clean_like, store=store)
    b = run_stage(stage="pretrain", params=StageParams(), inputs=[a.artifact], build=_train_like, store=store)
    return a.artifact, b.artifact


def test_report_renders_lineage(lineage, cli):
    _, model = lineage
    code, out, err = cli("report", "--from", model.id, "--json")
    assert code == 0, err
    summary = json.loads(out)
    report = Path(summary["path"]) / "report.html"
    assert sorted(p.name for p in Path(summary["path"]).iterdir()) == ["log.txt", "manifest.json", "report.html"]
    text = report.read_text()
    assert "<h2>clean" in text and "<h2>pretrain" in text and "raw data" in text
    assert "rejected_by_reason" in text and "training curves" in text and "MoE expert load" in text
    assert "artifact graph" in text
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r'src="(?!data:)', text)
    assert summary["metrics"]["artifacts"] == 2 and summary["metrics"]["images"] >= 5
    # the report is itself an artifact in the lineage: a second run is a cache hit
    code, out, _ = cli("report", "--from", model.id, "--json")
    assert json.loads(out)["cached"] is True


CHECKER_HEAD = """<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message||e))});</script>"""
CHECKER_TAIL = """<script>window.addEventListener('load',function(){var imgs=[].slice.call(document.images);
var broken=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0)}).length;
document.body.setAttribute('data-check',JSON.stringify({images:imgs.length,broken:broken,errors:window.__errors,
toc:document.querySelectorAll('#toc a').length}));});</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make test installs Debian's chromium)")
def test_report_loads_in_headless_chromium(lineage, cli, tmp_path):
    _, model = lineage
    code, out, _ = cli("report", "--from", model.id, "--json")
    report = Path(json.loads(out)["path"]) / "report.html"
    page = tmp_path / "checked.html"
    text = report.read_text()
    page.write_text(text.replace("<head>", "<head>" + CHECKER_HEAD, 1).replace("</body>", CHECKER_TAIL + "</body>", 1))
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"data-check=\"([^\"]*)\"", proc.stdout)
    assert match, proc.stderr[-2000:]
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check["errors"] == []
    assert check["images"] >= 5 and check["broken"] == 0
    assert check["toc"] >= 3  # the report's own script ran
