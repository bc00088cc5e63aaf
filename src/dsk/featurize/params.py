"""Parameters of `dsk featurize` (text options first, then table options).

    $ dsk featurize --vocab-size 512 --val-fraction 0.1
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from dsk.config import StageParams


class Params(StageParams):
    # ---- text
    vocab_size: int = Field(1024, ge=1, le=1_000_000, description="Text: vocabulary size of the trained BPE tokenizer, special tokens included (byte-level BPE needs at least 263).")
    tokenizer_type: Literal["bpe", "char"] = Field("bpe", description="Text: 'bpe' = byte-level BPE; 'char' = one token per character (vocab_size is then ignored).")
    tokenizer: Optional[str] = Field(None, description="Text: reuse the tokenizer of this artifact (id, tag or path) instead of training one.")
    min_frequency: int = Field(2, ge=1, description="Text: a BPE merge must occur at least this often in the training split.")
    val_fraction: float = Field(0.05, ge=0.0, le=0.5, description="Fraction of documents (text) or rows (table) held out for validation, chosen with the seed.")
    top_tokens: int = Field(20, ge=0, le=1000, description="Text: how many of the most frequent tokens the report lists.")
    # ---- table
    label_column: Optional[str] = Field(None, description="Table: the label column (default: the clean artifact's label_column).")
    n_estimators: int = Field(100, ge=10, le=5000, description="Table: trees of the gradient-boosted model used for SHAP and for the raw-vs-engineered CV score.")
    cross_top_k: int = Field(5, ge=0, le=50, description="Table: cross (product, ratio) the top-k numeric features by SHAP importance, and AND-cross the top-k categorical indicators.")
    cross_min_gain: float = Field(0.02, ge=0.0, le=1.0, description="Table: keep a cross only if its |label correlation| beats both parents' by this much.")
    cross_max_corr: float = Field(0.95, gt=0.0, le=1.0, description="Table: drop a cross whose |correlation| with an existing feature reaches this (a near-copy).")
    max_categories: int = Field(20, ge=2, le=1000, description="Table: a text column with at most this many distinct values is one-hot encoded; more is an error.")
    umap_components: int = Field(2, ge=0, le=50, description="Table: UMAP components fitted on the training split (0 = no UMAP).")
    umap_mode: Literal["add", "replace"] = Field("add", description="Table: 'add' UMAP components to the features or 'replace' the features with them.")
    umap_neighbors: int = Field(15, ge=2, le=200, description="Table: UMAP n_neighbors.")
    umap_epochs: int = Field(200, ge=10, le=2000, description="Table: UMAP optimisation epochs.")
    select: bool = Field(True, description="Table: run L1-regularised recursive feature elimination with cross-validation (RFECV).")
    l1_c: float = Field(0.5, gt=0.0, le=1000.0, description="Table: inverse L1 strength (C) of the logistic model used for selection.")
    cv_folds: int = Field(5, ge=2, le=20, description="Table: cross-validation folds for RFECV and the raw-vs-engineered score.")
