"""Data formats shared between stages: tokenizers, token shards, fitted table transforms.

Nothing heavy is imported here; import the submodule you need:

    from dsk.data.tokenizer import load_tokenizer
    from dsk.data.shards import open_split, read_meta
    from dsk.data.table_features import load_transform
"""
