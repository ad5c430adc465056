"""A free TCP port, for rendezvous stores and the servers this trainer starts."""
from __future__ import annotations

import random
import socket
from pathlib import Path

_PICKER = random.SystemRandom()  # never the seeded `random`: every rank would pick alike
_LOWEST = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at `host` now ("" = every interface); racy by nature: bind soon.

    Chosen at random below the kernel's ephemeral range: a port the kernel handed out for
    bind(0) is also one it hands to outgoing connections (gloo opens many), so between our
    check and the store's bind another process's connection could take it (EADDRINUSE seen
    with two test workers). Below that range only another chooser can collide."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    top = _ephemeral_low()
    for _ in range(64):
        port = _PICKER.randrange(_LOWEST, top) if top > _LOWEST else 0
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket(family) as s:  # a crowded low range: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; BSD / macOS use 49152 and up
