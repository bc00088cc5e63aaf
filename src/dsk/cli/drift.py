"""`dsk drift`: compare new data with a reference artifact's training data; exit 1 on drift.

    $ dsk drift --reference clean:latest --current data/new.csv
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsk import console


def drift(
    reference: str = typer.Option(..., "--reference", help="Reference artifact (id, tag, stage:latest): its lineage's clean table or featurize tokens are the baseline."),
    current: Path = typer.Option(..., "--current", help="New data: a CSV/parquet table, or a text file/directory (.txt/.jsonl/.parquet)."),
    out: Path = typer.Option(Path("drift.json"), "--out", help="Where to write the JSON result."),
    psi_threshold: float = typer.Option(0.2, "--psi-threshold", help="Tables: PSI at or above this flags a feature."),
    ks_alpha: float = typer.Option(0.01, "--ks-alpha", help="KS p-value below this (with statistic ≥ --ks-min-statistic) flags a feature / the length distribution."),
    ks_min_statistic: float = typer.Option(0.1, "--ks-min-statistic", help="Minimum KS statistic to flag (ignores tiny shifts in large samples)."),
    jsd_threshold: float = typer.Option(0.05, "--jsd-threshold", help="Text: token-unigram Jensen–Shannon divergence (bits) that flags drift."),
    unseen_threshold: float = typer.Option(0.02, "--unseen-threshold", help="Text: rate of tokens never seen in the reference training shards."),
    unknown_threshold: float = typer.Option(0.01, "--unknown-threshold", help="Text: rate of bytes the tokenizer maps to its unknown token."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Population stability and KS tests (tables), token divergence and OOV (text); exit 1 if drifted."""
    from dsk.drift import Thresholds, run_drift

    th = Thresholds(psi=psi_threshold, ks_alpha=ks_alpha, ks_min_statistic=ks_min_statistic, jsd=jsd_threshold,
                    unseen_token_rate=unseen_threshold, unknown_byte_rate=unknown_threshold)
    result = run_drift(reference=reference, current=str(current), thresholds=th, out=out)
    if json_:
        console.print_json(result)
    else:
        table = Table(title=f"drift vs {result['reference']} ({result['kind']})", title_justify="left")
        if result["kind"] == "table":
            for col in ("feature", "PSI", "KS", "KS p", "drifted"):
                table.add_column(col)
            for r in result["features"]:
                table.add_row(r["feature"], f"{r['psi']:.3f}", f"{r['ks_statistic']:.3f}", f"{r['ks_pvalue']:.2g}",
                              "[red]yes[/red]" if r["drifted"] else "no")
        else:
            for col in ("statistic", "value", "threshold", "drifted"):
                table.add_column(col)
            for name, s in result["statistics"].items():
                table.add_row(name, f"{s['value']:.4g}", f"{s['threshold']:.4g}", "[red]yes[/red]" if s["drifted"] else "no")
        console.console.print(table)
        console.console.print(f"wrote {result['out']}; drifted: {', '.join(result['drifted']) or 'none'}")
    if result["drifted"]:
        raise typer.Exit(1)
