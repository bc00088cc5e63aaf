"""Artifact commands: ls, show, lineage, verify, tag, gc.

    $ dsk ls pretrain
    $ dsk lineage best
    $ dsk gc --dry-run
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from dsk import console
from dsk.artifacts import Artifact, Store, human_size, read_manifest
from dsk.errors import DskError
from dsk.registry import BY_NAME

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def _created(art: Artifact) -> str:
    raw = art.manifest.get("finished_at", "")
    try:
        return datetime.fromisoformat(raw).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return raw


def _key_metric(art: Artifact) -> str:
    name = art.manifest.get("key_metric")
    if not name or name not in art.metrics:
        return ""
    value = art.metrics[name]
    return f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"


def ls(
    stage: Optional[str] = typer.Argument(None, help="Only this stage's artifacts."),
    json_: bool = JsonOpt,
) -> None:
    """List artifacts: id, stage, kind, created, inputs, size, key metric."""
    store = Store.open()
    if stage is not None and stage not in BY_NAME:
        raise DskError(f"unknown stage {stage!r}; stages: {', '.join(BY_NAME)}")
    arts = sorted(store.iter_artifacts(stage), key=lambda a: a.manifest.get("finished_at", ""))
    tags_by_id: dict[str, list[str]] = {}
    for name, aid in store.tags().items():
        tags_by_id.setdefault(aid, []).append(name)
    if json_:
        console.print_json([
            {"id": a.id, "stage": a.stage, "kind": a.kind, "created": a.manifest.get("finished_at"),
             "inputs": [i.get("id") or i.get("path") for i in a.manifest.get("inputs", [])],
             "size_bytes": a.manifest.get("size_bytes"), "metrics": a.metrics,
             "tags": tags_by_id.get(a.id, [])}
            for a in arts
        ])
        return
    table = Table(title=f"artifacts in {store.root}", title_justify="left")
    for col in ("id", "stage", "kind", "created", "inputs", "size", "key metric", "tags"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "stage", "created"))
    for a in arts:
        inputs = ", ".join(
            i["id"] if i.get("type") == "artifact" else f"raw:{i.get('sha256', '')[:8]}"
            for i in a.manifest.get("inputs", [])
        )
        table.add_row(a.id, a.stage, a.kind, _created(a), inputs,
                      human_size(a.manifest.get("size_bytes", 0)), _key_metric(a),
                      ", ".join(tags_by_id.get(a.id, [])))
    console.console.print(table)
    if not arts:
        console.console.print("no artifacts yet: run `dsk run pipelines/default.yaml`")


def show(
    ref: str = typer.Argument(..., help="Artifact id, id prefix, tag or path."),
    json_: bool = JsonOpt,
) -> None:
    """Show an artifact's manifest."""
    art = Store.open().resolve(ref)
    if json_:
        console.print_json(art.manifest)
        return
    console.console.print(f"[bold]{art.stage}[/bold] {art.id}  ({art.path})")
    console.console.print_json(data=art.manifest)


def _tree(node: dict[str, Any], tree: Tree) -> None:
    for child in node["inputs"]:
        if "artifact" in child:
            a = child["artifact"]
            sub = tree.add(f"[bold]{a.stage}[/bold] {a.id} ({a.kind}) {_key_metric(a)}")
            _tree(child, sub)
        elif "raw" in child:
            r = child["raw"]
            tree.add(f"[dim]raw[/dim] {r.get('path')} sha256:{r.get('sha256', '')[:12]} "
                     f"({r.get('files')} files, {human_size(r.get('bytes', 0))})")
        else:
            tree.add(f"[red]missing[/red] {child['missing'].get('stage')} {child['missing'].get('id')}")


def _lineage_json(node: dict[str, Any]) -> dict[str, Any]:
    a = node["artifact"]
    return {"id": a.id, "stage": a.stage, "kind": a.kind, "inputs": [
        _lineage_json(c) if "artifact" in c else c.get("raw") or {"type": "missing", **c["missing"]}
        for c in node["inputs"]]}


def lineage(
    ref: str = typer.Argument(..., help="Artifact id, id prefix, tag or path."),
    json_: bool = JsonOpt,
) -> None:
    """Show the chain of artifacts back to the raw data, as a tree."""
    store = Store.open()
    art = store.resolve(ref)
    node = store.lineage(art)
    if json_:
        console.print_json(_lineage_json(node))
        return
    tree = Tree(f"[bold]{art.stage}[/bold] {art.id} ({art.kind}) {_key_metric(art)}")
    _tree(node, tree)
    console.console.print(tree)


def verify(
    ref: Optional[str] = typer.Argument(None, help="One artifact (default: all)."),
    json_: bool = JsonOpt,
) -> None:
    """Recompute every file's sha256 and size; exit 1 on any mismatch."""
    store = Store.open()
    results: dict[str, list[str]] = {}
    if ref is not None:
        art = store.resolve(ref)
        results[f"{art.stage}/{art.id}"] = store.verify(art)
    else:
        for d in store.iter_dirs():
            try:
                art = Artifact(d, read_manifest(d))
            except DskError as exc:
                results[f"{d.parent.name}/{d.name}"] = [str(exc)]
                continue
            results[f"{art.stage}/{art.id}"] = store.verify(art)
    bad = {k: v for k, v in results.items() if v}
    if json_:
        console.print_json({"checked": len(results), "failed": bad})
    else:
        for name, problems in results.items():
            if problems:
                console.console.print(f"[red]FAIL[/red] {name}: " + "; ".join(problems))
            else:
                console.info(f"[green]ok[/green]   {name}")
        console.console.print(f"{len(results)} checked, {len(bad)} failed")
    if bad:
        raise typer.Exit(1)


def tag(
    ref: str = typer.Argument(..., help="Artifact id, id prefix, tag or path."),
    name: str = typer.Argument(..., help="Tag name."),
    delete: bool = typer.Option(False, "--delete", help="Remove the tag NAME instead."),
) -> None:
    """Tag an artifact (tagged artifacts and their lineage survive `dsk gc`)."""
    store = Store.open()
    if delete:
        store.untag(name)
        console.info(f"removed tag {name}")
        return
    art = store.tag(ref, name)
    console.info(f"tagged {art.stage} {art.id} as [bold]{name}[/bold]")


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    json_: bool = JsonOpt,
) -> None:
    """Remove artifacts that are not tagged, not the latest of a stage, and not in their lineage."""
    store = Store.open()
    doomed = store.gc(dry_run=dry_run)
    if json_:
        console.print_json({"dry_run": dry_run, "removed": [f"{a.stage}/{a.id}" for a in doomed]})
        return
    verb = "would remove" if dry_run else "removed"
    for a in doomed:
        console.console.print(f"{verb} {a.stage} {a.id} ({human_size(a.manifest.get('size_bytes', 0))})")
    console.console.print(f"{verb} {len(doomed)} artifact(s)")
