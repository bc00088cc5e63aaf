"""`dsk augment`: seeded, composable augmentation of text, images and time series.

Writes the originals plus `copies` augmented variants per example; every variant records its
source example, the ops applied and its seed. Text comes from a clean artifact; images and
time series from a raw .npz/.npy file or a folder of PNGs. The ops live in the library
(`dsk.data.augment_ops`) so a training loader can apply the same pipeline on the fly.

    $ dsk augment                                   # latest clean text artifact, default EDA
    $ dsk augment digits.npz --modality image --copies 2 \
        --ops '[{"type": "RandomRotation", "params": {"degrees": 15}}, {"type": "MixUp"}]'
"""

from dsk.augment.params import Params


def run(*, source=None, params=None, seed=0, force=False, store=None):
    from dsk.augment.stage import run as _run

    return _run(source=source, params=params or Params(), seed=seed, force=force, store=store)


__all__ = ["Params", "run"]
