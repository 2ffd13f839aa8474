"""A fault-injecting reverse proxy in front of moto: S3 that answers errors for a while.

Why not ``tests.support.servers.S3Faults``: it hooks one boto3 client inside one process, while
here the failing clients live in other processes (the operator, every Job pod). The proxy fails
requests on the wire instead, with the same S3 error body (``ServiceUnavailable``, 503) that
S3Faults serves, so every client's real retry path (botocore's, then spin_runtime.storage's) runs.

``fail_window(seconds, every=3)``: for ``seconds``, two out of every ``every`` requests get a 503
(a flapping S3, not a dead one: each client's retries eventually get through).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}  # fmt: skip # a word list, packed


class S3FaultProxy:
    """Forwards every request to ``upstream``; injects 503s inside a fault window."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname or "127.0.0.1", target.port or 80
        self._lock = threading.Lock()
        self._until = 0.0
        self._every = 3
        self._counter = 0
        self.injected = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._should_fail():
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_BODY)))
                    self.end_headers()
                    self.wfile.write(ERROR_BODY)
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=60
                )
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients hang up on retries and at shutdown: not worth a traceback

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="s3-proxy", daemon=True
        )

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_window(self, seconds: float, every: int = 3) -> None:
        """From now, for ``seconds``: all but one of each ``every`` requests answer 503."""
        with self._lock:
            self._until, self._every, self._counter = time.monotonic() + seconds, every, 0

    @property
    def failing(self) -> bool:
        return time.monotonic() < self._until

    def _should_fail(self) -> bool:
        with self._lock:
            if time.monotonic() >= self._until:
                return False
            self._counter += 1
            if self._counter % self._every == 0:
                return False
            self.injected += 1
            return True
