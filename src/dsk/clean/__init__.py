"""`dsk clean`: turn raw text or tables into a clean artifact, keeping every dropped row with its reason.

Text (.txt/.jsonl/.parquet with a text field): Unicode/whitespace normalisation, Gopher/C4-style
quality filters, optional PII redaction, exact dedup, SimHash near-dup (or MinHash-LSH).
Tables (.csv/.parquet): duplicate rows, 3σ/MAD outliers, imputation, label issues, robust scaling.

    $ dsk clean data/sample/tinyshakespeare.txt
    $ dsk clean data/sample/breast_cancer.csv --label diagnosis
"""

from dsk.clean.params import Params

__all__ = ["Params", "run"]


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.clean.stage import run as _run  # heavy imports (numpy, pandas, sklearn) happen here

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store)
