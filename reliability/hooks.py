"""A local webhook receiver for tests and ``make reliability``: it records every delivery
(headers and body) and answers 500 to the first ``fail_first`` attempts."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[dict] = []
        self.fail_left = fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["content-length"]))
                with outer.lock:
                    failing = outer.fail_left > 0
                    outer.fail_left -= failing
                    outer.got.append({"headers": dict(self.headers), "body": body})
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def deliveries(self) -> list[dict]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.http.shutdown()
