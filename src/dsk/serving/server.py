"""Running the API with uvicorn: in the foreground (`dsk serve`) or in a thread on a free port
(tests, the pipeline's smoke test, `dsk chat` against a local model).

    >>> with ServerThread(app) as server:
    ...     httpx.get(server.url + "/health").json()
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from dsk.errors import DskError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (no race between choosing and binding)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DskError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app: Any, log_level: str) -> uvicorn.Config:
    # access_log off: the audit log is the record, and uvicorn's would print every request
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)


def serve_forever(app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
    sock = bind_socket(host, port)
    server = uvicorn.Server(_config(app, log_level))
    server.run(sockets=[sock])


class ServerThread:
    """Serve ``app`` on ``host``:(a free port) in a daemon thread until :meth:`stop`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"dsk-serve-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout_s:g}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
