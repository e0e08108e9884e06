"""Child processes the same way everywhere: stopping one (SIGTERM, a grace period, then SIGKILL) and the free
ports of 127.0.0.1 that a server started for a test or the demo listens on."""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 20000


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Ask ``process`` to exit (SIGTERM) and wait; SIGKILL it if it still runs after ``grace_s`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_excerpt(path: Path, most: int = 10, pattern: str | None = None) -> str:
    """What a server that failed to start wrote about it: the last ``most`` lines of its log at ``path`` that match
    ``pattern`` (a regular expression for its error lines), or its last lines where none match or none is given."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} cannot be read)"
    chosen = [line for line in lines if re.match(pattern, line)] if pattern else []
    return "\n".join((chosen or lines)[-most:])


def ephemeral_range_start() -> int:
    """The lowest port the kernel gives to outgoing connections and to ``bind(port 0)`` (Linux's default where the
    kernel does not say)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports of 127.0.0.1 that nothing is bound to now, below the ephemeral range.

    A port from the ephemeral range (what ``bind(port 0)`` hands out) can be taken between the moment it is chosen
    and the moment the server binds it: every outgoing connection, such as a client polling the server while it
    starts or the server's components dialling each other, gets its local port from that range. Below the range
    no connection takes a port, so a server started on these ports does not fail with "address already in use".
    Where fewer than 1,000 ports lie between ``LOWEST_PORT`` and the range, the kernel's ``bind(port 0)`` choice is
    used.
    """
    room = ephemeral_range_start() - LOWEST_PORT
    ports: list[int] = []
    while len(ports) < count:
        port = bound_port(LOWEST_PORT + secrets.randbelow(room) if room >= 1000 else 0)
        if port is not None and port not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    """One port of ``free_ports``."""
    return free_ports(1)[0]


def bound_port(port: int) -> int | None:
    """The port a socket bound to 127.0.0.1:``port`` (0: the kernel's choice) got, or None where it is taken."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
        return sock.getsockname()[1]
