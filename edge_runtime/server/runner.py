"""Serving the app with uvicorn, set for a small device that runs for months unattended.

Connections beyond the generation queue's needs are refused by uvicorn itself (limit_concurrency), idle
keep-alive connections are closed after a few seconds, and a stop signal ends the running generation at its
next token instead of waiting for a long reply to finish.
"""

from __future__ import annotations

import uvicorn

from edge_runtime.model import Model
from edge_runtime.server.app import ServerSettings, create_app

# Connections at once: the queue's waiting places, the one generating, and room for /health, /metrics and
# the page's static files.
SPARE_CONNECTIONS = 32


def serve(model: Model, settings: ServerSettings, host: str, port: int, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C or SIGTERM from systemd)."""
    config = uvicorn.Config(create_app(model, settings), host=host, port=port, log_level=log_level,
                            limit_concurrency=settings.queue_depth + SPARE_CONNECTIONS, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False, proxy_headers=False)
    uvicorn.Server(config).run()
