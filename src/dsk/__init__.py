"""dsk: raw data to a served model as one reproducible pipeline of versioned artifacts.

    $ dsk run pipelines/default.yaml
"""

__version__ = "0.1.0"
