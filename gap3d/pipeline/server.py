"""A quiet HTTP file server on a loopback address, for feeding local files to img2dataset.

The embedded demo goes through the same download stage as real URL lists; this server is
what makes its renders "downloadable". It only ever binds loopback addresses, so running the
demo never exposes files to the network.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files without a log line per request (img2dataset makes thousands)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # request threads never keep the interpreter alive
    allow_reuse_address = True


def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (or ``localhost``), else raise ValueError."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as e:
        raise ValueError(
            f"server host '{host}' is not an IP address; use a loopback address such as "
            "127.0.0.1 (data.demo.host)"
        ) from e
    if not addr.is_loopback:
        raise ValueError(
            f"refusing to serve files on non-loopback address {host}: the demo server only "
            "binds 127.0.0.0/8 or ::1 (set data.demo.host=127.0.0.1)"
        )
    return host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for tests and overrides)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_directory(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``root`` over HTTP on ``host:port`` in a background thread.

    Yields the base URL (``http://127.0.0.1:PORT``, no trailing slash); ``port=0`` picks a
    free port. The server stops when the ``with`` block ends.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot serve {root}: not a directory")
    host = check_loopback(host)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server_cls = _Server
    if ":" in host:
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = server_cls((host, port), handler)
    except OSError as e:
        raise RuntimeError(
            f"cannot serve {root} on {host}:{port} ({e}); the port is probably in use: pick "
            "another one with data.demo.port=PORT"
        ) from e
    bound_port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.2},
        name=f"serve:{bound_port}",
        daemon=True,
    )
    thread.start()
    url_host = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
