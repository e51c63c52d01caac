"""Serving the app with uvicorn, set for a small device that runs for months unattended.

Connections beyond the generation queue's needs are refused by uvicorn itself (limit_concurrency), idle
keep-alive connections are closed after a few seconds, and a stop signal ends the running generation at its
next token instead of waiting for a long reply to finish.
"""

from __future__ import annotations

import ipaddress
import socket

import uvicorn

from edge_runtime.model import Model
from edge_runtime.server.app import ServerSettings, create_app

# Connections at once: the queue's waiting places, the one generating, and room for /health, /metrics and
# the page's static files.
SPARE_CONNECTIONS = 32


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this device."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Fail before loading anything slow when the address is taken, with the address in the message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or stop the "
                          "program using it") from None


def serve(model: Model, settings: ServerSettings, host: str, port: int, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C or SIGTERM from systemd)."""
    config = uvicorn.Config(create_app(model, settings), host=host, port=port, log_level=log_level,
                            limit_concurrency=settings.queue_depth + SPARE_CONNECTIONS, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False, proxy_headers=False)
    uvicorn.Server(config).run()
