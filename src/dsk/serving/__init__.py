"""dsk's model server library: the continuous-batching engine, per-request sampling, the
OpenAI-compatible FastAPI app, auth, content filter, audit log, metrics, and a smoke test.

`dsk serve` (the stage) is a thin wrapper over this package:

    >>> from dsk.serving.loader import load_engine
    >>> from dsk.serving.app import ServerConfig, create_app
    >>> from dsk.serving.server import ServerThread
    >>> engine, codec = load_engine(".dsk/artifacts/pretrain/<id>")
    >>> with ServerThread(create_app(engine, codec, ServerConfig(model_name="m"))) as server:
    ...     print(server.url)

Modules import torch/fastapi lazily where they can: importing this package is cheap.
"""


def smoke_test(model_artifact, **kwargs):
    from dsk.serving.smoke import smoke_test as _smoke_test

    return _smoke_test(model_artifact, **kwargs)


__all__ = ["smoke_test"]
