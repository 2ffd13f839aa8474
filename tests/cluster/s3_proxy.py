"""A fault-injecting reverse proxy in front of moto: S3 that answers errors for a while.

Why not ``tests.support.servers.S3Faults``: it hooks one boto3 client inside one process, while
here the failing clients live in other processes (the operator, every Job pod). The proxy fails
requests on the wire instead, with the same S3 error body (``ServiceUnavailable``, 503) that
S3Faults serves, so every client's real retry path (botocore's, then spin_common.storage's) runs.

``fail_next(requests, every=3)``: of the next ``requests`` requests, all but one of every ``every``
get a 503 (a flapping S3, not a dead one: each client's retries eventually get through). Counted
in requests, not seconds: how many errors land does not depend on how busy the machine is.
"""

from __future__ import annotations

import collections
import http.client
import threading
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
        self._budget = 0
        self._every = 3
        self._counter = 0
        self.injected = 0
        self.forwarded = 0
        self.answered: collections.Counter[int] = collections.Counter()  # forwarded, by status
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
                    # counted before the client can see the answer: a test that reads the
                    # counters right after its call returned read 0 when this came after
                    with proxy._lock:
                        proxy.forwarded += 1
                        proxy.answered[resp.status] += 1
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    # A HEAD's Content-Length is the object's size (no body follows): passed on
                    # as is. Counting the empty body made every object look 0 bytes long to
                    # head_object, e.g. to the runtime's safetensors header check.
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

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

    def fail_next(self, requests: int, every: int = 3) -> None:
        """Of the next ``requests`` requests, all but one of each ``every`` answer 503."""
        with self._lock:
            self._budget, self._every, self._counter = requests, every, 0

    def _should_fail(self) -> bool:
        with self._lock:
            if self._budget <= 0:
                return False
            self._budget -= 1
            self._counter += 1
            if self._counter % self._every == 0:
                return False
            self.injected += 1
            return True
