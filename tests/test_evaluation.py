"""`evaluate_over_http`: the client `dlpipe run` uses to check the served model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dlpipe.config import PipelineConfig
from dlpipe.evaluation import MAX_RETRIES, evaluate_over_http


class _Shedding(BaseHTTPRequestHandler):
    """Answers 503 + Retry-After: 0 to the first `shed` requests, then a prediction."""

    shed = 0
    seen = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).seen += 1
            shedding = type(self).seen <= type(self).shed
        if shedding:
            body, status = b'{"error": {"type": "overloaded"}}', 503
        else:
            answer = {"predictions": [{"class_index": 1}], "model_version": "4"}
            body, status = json.dumps(answer).encode(), 200
        self.send_response(status)
        if shedding:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Shedding]]]:
    handler = type("Handler", (_Shedding,), {"shed": 0, "seen": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_shed_requests_are_retried_not_counted_as_errors(
    server: tuple[str, type[_Shedding]],
) -> None:
    url, handler = server
    handler.shed = 3
    samples = [(b"png", 1)] * 5
    result = evaluate_over_http(url, samples, PipelineConfig(), clients=2)
    assert result.errors == 0 and result.retries == 3
    assert result.accuracy == 1.0 and result.versions == {"4": 5}
    assert handler.seen == 8


def test_a_server_that_keeps_shedding_is_an_error(server: tuple[str, type[_Shedding]]) -> None:
    url, handler = server
    handler.shed = 10**9
    result = evaluate_over_http(url, [(b"png", 1)] * 2, PipelineConfig(), clients=1)
    assert result.errors == 2 and result.retries == 2 * MAX_RETRIES
    assert handler.seen == 2 * (MAX_RETRIES + 1)
