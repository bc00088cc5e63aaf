"""`dsk featurize` entry point: pick the text or table track from the input's kind, then build.

    $ dsk featurize --vocab-size 1024
"""

from __future__ import annotations

from dsk.artifacts import Artifact, Store
from dsk.errors import DskError
from dsk.featurize.params import Params
from dsk.runtime import StageResult, resolve_inputs, run_stage

STAGE = "featurize"
TEXT_VERSION = "1"
TABLE_VERSION = "2"  # 2: SHAP beeswarm jitter drawn from a seeded generator


def input_track(art: Artifact) -> str:
    """'text' or 'table', from the artifact's kind, else from the files it holds."""
    kind = art.kind
    if kind in ("text", "table"):
        return kind
    if (art.path / "documents.parquet").is_file():
        return "text"
    if (art.path / "data.parquet").is_file():
        return "table"
    raise DskError(
        f"featurize reads a text or table artifact, but {art.stage} {art.id} is of kind {kind or '?'}; "
        "pass a clean or augment artifact"
    )


def resolve_tokenizer_artifact(store: Store, ref: str) -> Artifact:
    art = store.resolve(ref)
    if not (art.path / "tokenizer.json").is_file():
        raise DskError(
            f"--tokenizer {ref}: {art.stage} {art.id} has no tokenizer.json; "
            "pass a featurize (text) or model artifact"
        )
    return art


def run(*, source=None, params: Params, seed: int = 0, force: bool = False,
        store: Store | None = None) -> StageResult:
    from dsk.data.tokenizer import min_vocab_size

    store = store or Store.open()
    inputs = resolve_inputs(store, STAGE, source)
    art = inputs[0]
    if not isinstance(art, Artifact):  # featurize does not accept raw paths; keep the type checker honest
        raise DskError(f"featurize reads artifacts; run `dsk clean {source}` first")
    track = input_track(art)

    if track == "table":
        return run_stage(stage=STAGE, params=params, inputs=inputs, build=build_table, store=store,
                         seed=seed, force=force, kind="features", stage_version=f"table-{TABLE_VERSION}")

    extra: list[Artifact] = []
    if params.tokenizer:
        tok_art = resolve_tokenizer_artifact(store, params.tokenizer)
        extra.append(tok_art)
        # key the cache on the tokenizer artifact's id, not on the tag or path that named it
        params = params.model_copy(update={"tokenizer": tok_art.id})
    elif params.tokenizer_type == "bpe" and params.vocab_size < min_vocab_size("bpe"):
        raise DskError(
            f"vocab_size={params.vocab_size} is too small for byte-level BPE: it needs 256 byte tokens + "
            f"special tokens; use --vocab-size {min_vocab_size('bpe')} or more"
        )
    return run_stage(stage=STAGE, params=params, inputs=inputs, build=build_text, store=store,
                     seed=seed, force=force, kind="tokens", stage_version=f"text-{TEXT_VERSION}",
                     extra_inputs=extra)


# the tracks import numpy/pyarrow/sklearn; a cache hit never needs them
def build_text(ctx) -> None:
    from dsk.featurize.text import build_text as build

    build(ctx)


def build_table(ctx) -> None:
    from dsk.featurize.table import build_table as build

    build(ctx)
