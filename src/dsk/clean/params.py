"""The `dsk clean` parameter schema: every field is a `--option` with its description as help.

    $ dsk clean data/sample/tinyshakespeare.txt --min-words 1 --method minhash
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from dsk.config import StageParams


class Params(StageParams):
    kind: Literal["auto", "text", "table"] = Field(
        "auto", description="Data kind: auto detects it (.txt/.jsonl/.parquet with a text field -> text; .csv/.parquet -> table).")

    # ---- text: reading
    text_field: str = Field("text", description="Field holding the document text in .jsonl/.parquet input.")
    split: Literal["paragraph", "line", "file"] = Field(
        "paragraph", description="How a .txt file becomes documents: paragraphs separated by blank lines, one per line, or the whole file.")

    # ---- text: Gopher/C4-style quality filters (defaults chosen for prose)
    min_words: int = Field(3, ge=0, description="Drop documents with fewer words than this (Gopher uses 50 for web pages).")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words than this.")
    min_mean_word_length: float = Field(2.0, ge=0, le=100, description="Drop documents whose mean word length (characters) is below this.")
    max_mean_word_length: float = Field(12.0, ge=0, le=1000, description="Drop documents whose mean word length is above this (Gopher: 10).")
    max_symbol_word_ratio: float = Field(0.1, ge=0, le=10, description="Drop documents with more '#' and '...' symbols per word than this (Gopher: 0.1).")
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1, description="Drop documents where more than this fraction of lines repeat an earlier line of the same document (Gopher: 0.3).")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="Drop documents where fewer than this fraction of words contain a letter (Gopher: 0.8).")

    # ---- text: PII
    pii: bool = Field(False, description="Redact PII (e-mails, phones, IPs, card numbers) with typed placeholders like <EMAIL>.")
    pii_patterns: Optional[dict[str, str]] = Field(
        None, description="Regexes by placeholder type, replacing the built-in ones, e.g. '{EMAIL: \"\\\\S+@\\\\S+\"}'.")

    # ---- text: deduplication
    dedup: bool = Field(True, description="Remove exact duplicates (hash of the normalised text).")
    near_dup: bool = Field(True, description="Remove near-duplicates (SimHash or MinHash-LSH, see --method).")
    method: Literal["simhash", "minhash"] = Field(
        "simhash", description="Near-duplicate method: 64-bit SimHash with a block-permutation index, or datasketch MinHash-LSH.")
    shingle_size: int = Field(1, ge=1, le=16, description="Words per shingle for near-duplicate fingerprints (1 = the set of words; measured best for SimHash in benchmarks/clean_dedup.py).")
    simhash_k: int = Field(10, ge=0, le=16, description="SimHash: documents within this Hamming distance (of 64 bits) are candidate duplicates (10 finds ~95% of pairs with <= 10% of words edited; 3 only near-exact copies).")
    simhash_blocks: Optional[int] = Field(
        None, ge=2, le=32, description="SimHash index: split fingerprints into this many blocks (> simhash_k); C(blocks, k) sorted tables. Default simhash_k + 3: tables keyed on 3 blocks (k=10: 13 blocks, 286 tables, ~15-bit keys).")
    simhash_verify: Optional[int] = Field(
        22, ge=0, le=128, description="SimHash: a second independent 64-bit SimHash confirms each pair found within simhash_k: the distance summed over both (128 bits) must be <= this (null in a config file: no second fingerprint). Lets k grow for recall at precision ~1 (benchmarks/clean_dedup.py).")
    minhash_threshold: float = Field(0.8, gt=0, le=1, description="MinHash: Jaccard similarity at or above which documents are duplicates.")
    minhash_perms: int = Field(128, ge=16, le=1024, description="MinHash: number of permutations.")
    near_dup_min_words: int = Field(5, ge=1, description="Only documents with at least this many words take part in near-dup detection (short ones: exact dedup only).")
    workers: int = Field(0, ge=0, le=256, description="Processes for fingerprinting (and threads for the SimHash index); 0 uses every core.")

    # ---- tables
    label: Optional[str] = Field(None, description="Label column of a table (enables label-issue detection); it is never scaled or outlier-checked.")
    drop_duplicates: bool = Field(True, description="Tables: drop exact duplicate rows.")
    outliers: Literal["sigma", "mad", "none"] = Field(
        "sigma", description="Tables: outlier rule per numeric column: |x-mean| > t*std (sigma), robust MAD z-score (mad), or none.")
    outlier_threshold: float = Field(3.0, gt=0, le=100, description="Tables: outlier threshold t in standard deviations (or robust z for mad).")
    outlier_action: Literal["drop", "clip"] = Field("drop", description="Tables: drop outlier rows, or clip values to the threshold.")
    impute: Literal["median", "iterative", "none"] = Field(
        "median", description="Tables: fill missing numeric values with the median, or IterativeImputer multiple imputation (pooled).")
    n_imputations: int = Field(5, ge=1, le=50, description="Tables: number of imputations pooled for impute=iterative.")
    label_issues: Literal["reject", "mark", "off"] = Field(
        "reject", description="Tables: rows whose label disagrees with k-fold out-of-fold predictions (confident learning) go to rejects, are only marked, or this is off.")
    label_issue_rule: Literal["prune_by_noise_rate", "confident_joint"] = Field(
        "prune_by_noise_rate", description="Tables: confident-learning rule: prune_by_noise_rate (higher recall) or confident_joint off-diagonal (higher precision).")
    label_folds: int = Field(5, ge=2, le=20, description="Tables: folds for out-of-fold label-issue probabilities.")
    scale: bool = Field(True, description="Tables: robust-scale numeric features ((x - median) / IQR); saved in transform.json.")

    # field validators (not a model validator) so that an error names its key on the command line
    @field_validator("max_words")
    @classmethod
    def _max_words(cls, v: int, info: ValidationInfo) -> int:
        if v < info.data.get("min_words", 0):
            raise ValueError(f"must be >= min_words ({info.data['min_words']})")
        return v

    @field_validator("simhash_blocks")
    @classmethod
    def _blocks(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v <= info.data.get("simhash_k", 0):
            raise ValueError(f"must exceed simhash_k ({info.data['simhash_k']}): C(blocks, k) tables find every pair within k bits")
        return v

    @property
    def blocks(self) -> int:
        """SimHash index blocks: simhash_blocks, or simhash_k + 3 (keys of 3 blocks)."""
        return self.simhash_blocks if self.simhash_blocks is not None else self.simhash_k + 3
