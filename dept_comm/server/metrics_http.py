"""Serve the round metrics live in Prometheus text format, and print the summary table."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dept_comm.accounting import RoundMetrics, prometheus_text

logger = logging.getLogger(__name__)


def serve_metrics(
    host: str,
    port: int,
    records: Callable[[], Sequence[RoundMetrics]],
    live: Callable[[], str] = lambda: "",
) -> tuple[ThreadingHTTPServer, int]:
    """Start a daemon HTTP server answering GET /metrics (the closed rounds' figures, then
    ``live()``: e.g. the in-flight transfer gauges); returns it and its bound port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = (prometheus_text(list(records())) + live()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("metrics_http " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, int(server.server_address[1])


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def summary_table(records: Sequence[RoundMetrics]) -> str:
    """A plain-text bytes-per-round table (totals over workers; payload = protobuf bytes)."""
    header = (
        f"{'round':>5} {'workers':>7} {'up payload':>12} {'up raw':>12} {'down payload':>13} "
        f"{'down raw':>12} {'up/fp32 model':>13} {'down/fp32 model':>15}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        full = max(r.full_model_fp32_bytes * max(r.num_workers, 1), 1)
        lines.append(
            f"{r.round:>5} {r.num_workers:>7} {_human(r.up_payload_bytes):>12} {_human(r.up_raw_bytes):>12} "
            f"{_human(r.down_payload_bytes):>13} {_human(r.down_raw_bytes):>12} "
            f"{r.up_payload_bytes / full:>13.4f} {r.down_payload_bytes / full:>15.4f}"
        )
    return "\n".join(lines)
