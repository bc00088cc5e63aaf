"""Data utilities shared by stages and training code (no stage imports here).

    $ python -c "from dsk.data.augment_ops import describe_ops; print(describe_ops('image'))"
"""
