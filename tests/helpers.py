"""Helpers the test modules import (``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` for its conftest)."""

from __future__ import annotations

import socket

from torch.utils._python_dispatch import TorchDispatchMode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a server started next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``int(t)``, ``bool(t)``): each is a
    device synchronisation on an accelerator. ``with HostReads() as reads: ...; reads.count``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))
