"""Helpers the test modules import (``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` for its conftest)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a server started next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
