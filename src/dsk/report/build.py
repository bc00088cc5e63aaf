"""Builds the HTML report: walks the lineage oldest-first and renders a section per artifact.

Each stage's section shows what that stage records (report.json, metrics, metrics.jsonl
curves, PNGs it wrote); unknown stages fall back to their metrics table, so a new stage shows
up without changes here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact, human_size
from dsk.runtime import StageContext

CURVE_KEYS = ("loss", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s",
              "reward_margin", "preference_accuracy", "val_auc")


# ----------------------------------------------------------------------------- helpers


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return html.escape(json.dumps(v[:12], default=str)[:-1] + ", …]")
    if isinstance(v, (dict, list, tuple)):
        return html.escape(json.dumps(v, default=str)[:400])
    return html.escape(str(v))


def _flatten(prefix: str, value: Any, out: dict[str, Any], depth: int = 0) -> None:
    if isinstance(value, dict) and depth < 3:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out, depth + 1)
    else:
        out[prefix] = value


def _kv_table(data: dict[str, Any], caption: str = "") -> str:
    flat: dict[str, Any] = {}
    _flatten("", data, flat)
    if not flat:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in flat.items())
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class=kv>{cap}{rows}</table>"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        pass
    return rows


# ----------------------------------------------------------------------------- plots


def _bar_chart(counts: dict[str, float], title: str) -> str:
    plt = _plt()
    items = sorted(((k, float(v)) for k, v in counts.items()), key=lambda kv: -kv[1])[:25]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_title(title)
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v:g}", va="center", fontsize=8)
    return _png(fig)


def _curves(rows: list[dict[str, Any]], max_points: int) -> str | None:
    plt = _plt()
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})[:6]
    if not keys:
        return None
    n = len(keys)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3 * ((n + cols - 1) // cols)), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        stride = max(1, len(pts) // max_points)
        pts = pts[::stride]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _expert_heatmap(load: list[list[float]], title: str) -> str:
    plt = _plt()
    import numpy as np

    arr = np.asarray(load, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    fig, ax = plt.subplots(figsize=(min(12, 1 + 0.45 * arr.shape[1]), 1 + 0.45 * arr.shape[0]))
    im = ax.imshow(arr, aspect="auto", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    return _png(fig)


def _graph(chain: list[Artifact], edges: list[tuple[str, str]], raws: list[dict[str, Any]]) -> str:
    """The artifact graph, drawn as boxes in lineage order with arrows for every input edge."""
    plt = _plt()
    nodes = [("raw:" + r["sha256"][:8], "raw\n" + Path(str(r.get("path", ""))).name) for r in raws]
    nodes += [(a.id, f"{a.stage}\n{a.id}") for a in chain]
    pos = {key: (0, -i) for i, (key, _) in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(5, 0.9 * len(nodes) + 0.5))
    for key, label in nodes:
        x, y = pos[key]
        ax.text(x, y, label, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "fc": "#e8eef7", "ec": "#4c72b0"})
    for src, dst in edges:
        if src in pos and dst in pos:
            (x0, y0), (x1, y1) = pos[src], pos[dst]
            bend = 0.0 if abs(y0 - y1) == 1 else 0.35
            ax.annotate("", xy=(x1, y1 + 0.28), xytext=(x0, y0 - 0.28),
                        arrowprops={"arrowstyle": "->", "color": "#555", "connectionstyle": f"arc3,rad={bend}"})
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-len(nodes) + 0.4, 0.6)
    ax.axis("off")
    return _png(fig)


# ----------------------------------------------------------------------------- sections


def _section(art: Artifact, params) -> str:
    parts = [f'<section id="{art.stage}-{art.id}"><h2>{html.escape(art.stage)} <code>{art.id}</code> '
             f'<small>{html.escape(art.kind)} · {human_size(art.manifest.get("size_bytes", 0))} · '
             f'{art.manifest.get("duration_s", 0):.1f}s</small></h2>']
    params_table = _kv_table(art.params)
    if params_table:
        parts.append(f"<details><summary>params ({len(art.params)})</summary>{params_table}</details>")
    metrics = art.metrics
    if metrics:
        parts.append(_kv_table(metrics, "metrics"))
    report = _read_json(art.path / "report.json")
    if isinstance(report, dict):
        count_dicts = {k: v for k, v in report.items()
                       if isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values())}
        for name, counts in list(count_dicts.items())[:4]:
            parts.append(_img(_bar_chart(counts, f"{art.stage}: {name}"), f"{art.stage} {name}"))
        scalars = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
        if scalars:
            parts.append(_kv_table(scalars, "report"))
        top = report.get("top_tokens") or report.get("most_frequent_tokens")
        if isinstance(top, list) and top:
            rows = "".join(f"<tr><td>{_fmt(t)}</td></tr>" for t in top[:20])
            parts.append(f"<table class=kv><caption>most frequent tokens</caption>{rows}</table>")
    rows = _read_jsonl(art.path / "metrics.jsonl")
    if rows:
        curves = _curves(rows, params.max_curve_points)
        if curves:
            parts.append(_img(curves, f"{art.stage}: training curves"))
        loads = [r["expert_load"] for r in rows if isinstance(r.get("expert_load"), list)]
        if loads:
            parts.append(_img(_expert_heatmap(loads[-1], "expert load (last record)"), f"{art.stage}: MoE expert load"))
    expert_file = _read_json(art.path / "expert_load.json")
    if isinstance(expert_file, (list, dict)):
        load = expert_file.get("load") if isinstance(expert_file, dict) else expert_file
        if isinstance(load, list) and load:
            parts.append(_img(_expert_heatmap(load, "expert load"), f"{art.stage}: MoE expert load"))
    for png in sorted(art.path.rglob("*.png")):
        parts.append(_img(base64.b64encode(png.read_bytes()).decode(), f"{art.stage}: {png.name}"))
    if params.include_manifests:
        parts.append(f"<details><summary>manifest</summary><pre>{html.escape(json.dumps(art.manifest, indent=2, default=str))}</pre></details>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _serve_numbers() -> str:
    path = Path("benchmarks/results/serve_load.json")
    data = _read_json(path) if path.exists() else None
    if not data:
        return ""
    return f"<section id=serve><h2>serve benchmark</h2>{_kv_table(data if isinstance(data, dict) else {'results': data})}</section>"


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h2 small{font-weight:normal;color:#777;font-size:.7em}
table.kv{border-collapse:collapse;margin:.6em 0;font-size:13px}
table.kv caption{text-align:left;font-weight:bold;color:#555}
table.kv th,table.kv td{border:1px solid #e3e3e3;padding:2px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f6f8fa;font-weight:normal;color:#444}
figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#777;font-size:12px}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:12px}#toc a{margin-right:1em}
"""

TOC_SCRIPT = """
document.addEventListener('DOMContentLoaded', function () {
  var toc = document.getElementById('toc');
  document.querySelectorAll('section[id] > h2').forEach(function (h) {
    var a = document.createElement('a');
    a.href = '#' + h.parentElement.id;
    a.textContent = h.firstChild.textContent.trim();
    toc.appendChild(a);
  });
});
"""


def build(ctx: StageContext) -> None:
    target = ctx.input
    store = ctx.store
    # ---- the lineage, oldest first (inputs before the artifacts made from them)
    order: list[Artifact] = []
    raws: list[dict[str, Any]] = []
    edges: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(art: Artifact) -> None:
        if art.id in seen:
            return
        seen.add(art.id)
        for inp in art.manifest.get("inputs", []):
            if inp.get("type") == "artifact":
                parent = store.find_by_id(inp["id"])
                if parent is not None:
                    visit(parent)
                    edges.append((parent.id, art.id))
            else:
                key = "raw:" + inp.get("sha256", "")[:8]
                if all("raw:" + r["sha256"][:8] != key for r in raws):
                    raws.append(inp)
                edges.append((key, art.id))
        order.append(art)

    visit(target)  # type: ignore[arg-type]
    related = [a for a in ctx.extra_inputs if a.id not in seen]
    for art in related:
        seen.add(art.id)
        edges.extend((i, art.id) for i in art.input_ids)
    ctx.log.info(f"report over {len(order)} artifact(s): " + " → ".join(a.stage for a in order))

    body = [f"<h1>{html.escape(ctx.params.title)}</h1>",
            f"<p>Lineage of <b>{html.escape(target.stage)}</b> <code>{target.id}</code>: "  # type: ignore[union-attr]
            + " → ".join(html.escape(a.stage) for a in order) + "</p><nav id=toc></nav>",
            "<section id=graph><h2>artifact graph</h2>" + _img(_graph(order + related, edges, raws), "artifact graph") + "</section>"]
    if raws:
        rows = "".join(f"<tr><td>{html.escape(str(r.get('path')))}</td><td><code>{r.get('sha256', '')[:16]}</code></td>"
                       f"<td>{r.get('files')}</td><td>{human_size(int(r.get('bytes', 0)))}</td></tr>" for r in raws)
        body.append(f"<section id=raw><h2>raw data</h2><table class=kv><tr><th>path</th><th>sha256</th>"
                    f"<th>files</th><th>size</th></tr>{rows}</table></section>")
    for art in order:
        body.append(_section(art, ctx.params))
    if related:
        body.append("<h2 id=related>related artifacts</h2><p>Made from models of this lineage, but not on it.</p>")
        for art in related:
            body.append(_section(art, ctx.params))
    body.append(_serve_numbers())
    doc = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
           f"<title>{html.escape(ctx.params.title)}</title><style>{STYLE}</style>"
           f"<script>{TOC_SCRIPT}</script></head><body>{''.join(body)}</body></html>")
    (ctx.out / "report.html").write_text(doc, encoding="utf-8")
    ctx.kind = "report"
    ctx.metrics = {"artifacts": len(order), "related": len(related), "images": doc.count("<img "), "bytes": len(doc.encode())}
    ctx.key_metric = "artifacts"
    ctx.log.info(f"wrote report.html ({human_size(len(doc.encode()))}, {ctx.metrics['images']} images)")
