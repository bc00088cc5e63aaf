"""`dsk featurize`: a tokenizer + token shards for text, engineered features for tables.

The input's kind picks the track: a `text` artifact (clean or augment) gets a byte-level BPE
(or character-level) tokenizer and flat memmap token shards split by document; a `table`
artifact gets SHAP importance, feature crosses, UMAP components and L1 selection, saved as a
replayable transform. See docs/featurize.md.

    $ dsk featurize --vocab-size 1024              # the latest clean/augment artifact
    $ dsk featurize text_v2 --tokenizer base_tok    # reuse the tokenizer of artifact base_tok
    $ dsk featurize <table-artifact> --umap-components 2
"""

from dsk.featurize.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.featurize.stage import run as _run  # heavy imports happen here, lazily

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store)


__all__ = ["Params", "run"]
