"""Serving the review app: a socket on 127.0.0.1 (another address only when asked), a free port unless
one is given, a random token, uvicorn until SIGINT or SIGTERM (it stops cleanly on either)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import webbrowser
from typing import Callable

from verify.review.app import LOOPBACK_HOSTS, ReviewSource, create_app

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one. OSError (one line) when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGINT / SIGTERM after its graceful shutdown (exit by signal); here
        stopping is the whole answer to the signal, so the command ends normally (exit 0)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()
            log.info("review: stopping on signal %d", sig)

    return Server


def review_url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def serve(source: ReviewSource, *, host: str = "127.0.0.1", port: int = 0, open_browser: bool = True,
          announce: Callable[[str], None] = print, token: str | None = None) -> None:
    """Run the app until SIGINT / SIGTERM. `announce(url)` is called once the socket listens (the CLI
    prints it as the first line of stdout, as Jupyter does)."""
    import uvicorn

    _Server = _server_class()
    token = token or secrets.token_urlsafe(24)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    loopback = host in ("127.0.0.1", "localhost", "::1")
    app = create_app(source, token, allowed_hosts=LOOPBACK_HOSTS if loopback else ["*"])
    url = review_url(host, port, token)
    announce(url)
    if open_browser:
        threading.Timer(0.5, lambda: webbrowser.open(url)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config)
    try:
        server.run(sockets=[sock])  # handles SIGINT and SIGTERM: finishes requests in flight, then returns
    finally:
        sock.close()
