"""Data formats shared between stages: tokenizers, token shards, fitted table transforms, augmentation ops.

Nothing heavy is imported here, and nothing here imports a stage; import the submodule you need:

    from dsk.data.tokenizer import load_tokenizer
    from dsk.data.shards import open_split, read_meta
    from dsk.data.table_features import load_transform
    from dsk.data.augment_ops import describe_ops
"""
