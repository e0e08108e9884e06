"""The ports the tests' and the demo's servers listen on: free, distinct, out of the kernel's ephemeral range; a server
that cannot bind one stops at once and quotes what its log says."""

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts import processes
from scripts.processes import LOWEST_PORT, ephemeral_range_start, free_ports
from scripts.redisctl import RedisServer
from scripts.s3ctl import S3Server


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert all(LOWEST_PORT <= port < ephemeral_range_start() for port in ports)
    sockets = [socket.socket() for _ in ports]
    try:
        for sock, port in zip(sockets, ports, strict=True):
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_is_never_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the room below the range narrowed to 1,000 ports and a listener on every even one, only odd ones come."""
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(f"{LOWEST_PORT + 1000}\t60999\n")
    monkeypatch.setattr(processes, "EPHEMERAL_RANGE_FILE", range_file)
    listeners = []
    try:
        for port in range(LOWEST_PORT, LOWEST_PORT + 1000, 2):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue  # taken already: still not free
            sock.listen()
            listeners.append(sock)
        taken = {sock.getsockname()[1] for sock in listeners}
        ports = free_ports(100)
    finally:
        for sock in listeners:
            sock.close()
    assert len(taken) > 400
    assert not taken & set(ports)
    assert all(LOWEST_PORT <= port < LOWEST_PORT + 1000 for port in ports)


def test_without_room_below_the_range_the_kernel_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text(f"{LOWEST_PORT + 10}\t60999\n")
    monkeypatch.setattr(processes, "EPHEMERAL_RANGE_FILE", range_file)
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert all(port >= ephemeral_range_start() for port in ports)


def seaweedfs_and_its_filer_port() -> tuple[S3Server, int]:
    server = S3Server()
    return server, server.ports["filer.grpc"]


def redis_server_and_its_port() -> tuple[RedisServer, int]:
    taken = free_ports(1)[0]
    return RedisServer(port=taken), taken


@pytest.mark.services
@pytest.mark.parametrize("server_and_port", [seaweedfs_and_its_filer_port, redis_server_and_its_port],
                         ids=["seaweedfs", "redis"])
def test_a_server_that_cannot_bind_its_port_stops_at_once_and_quotes_its_log(
        server_and_port: Callable[[], tuple[S3Server | RedisServer, int]]) -> None:
    server, taken = server_and_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        with pytest.raises(RuntimeError, match=rf"(?si)did not start.*127\.0\.0\.1:{taken}: bind: address already in use"):
            server.start()
    assert server.process is None
