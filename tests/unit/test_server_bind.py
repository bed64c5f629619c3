"""A service never shares its listen port: a second one on a port in use fails with a clear error."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest

from conveyor.common import server
from conveyor.common.server import EXIT_ADDRESS_IN_USE, AddressInUse


async def test_second_server_on_a_port_in_use_raises_address_in_use() -> None:
    first = await server.start("127.0.0.1:0", [])
    try:
        addr = f"127.0.0.1:{first.port}"
        with pytest.raises(AddressInUse) as caught:
            await server.start(addr, [])
        assert caught.value.addr == addr
        assert "already in use" in str(caught.value)
        assert "CONVEYOR_GRPC_ADDR" in str(caught.value)
    finally:
        await first.stop(0)


async def test_a_free_port_still_binds_after_a_refused_bind() -> None:
    first = await server.start("127.0.0.1:0", [])
    port = first.port
    await first.stop(0)
    again = await server.start(f"127.0.0.1:{port}", [])  # the port is free again: no false AddressInUse
    try:
        assert again.port == port
    finally:
        await again.stop(0)


async def test_bad_host_is_not_reported_as_address_in_use() -> None:
    with pytest.raises(OSError) as caught:
        server.bind(grpc.aio.server(), "203.0.113.7:0")  # TEST-NET-3: never a local address
    assert not isinstance(caught.value, AddressInUse)


_SERVE = """
from conveyor.common import server
async def main():
    await server.serve({addr!r}, [])
server.run_process(main)
"""


def test_a_process_started_on_a_port_in_use_exits_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-c", _SERVE.format(addr=addr)], capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == EXIT_ADDRESS_IN_USE, done.stderr
    assert f"error: cannot listen on {addr}: the address is already in use" in done.stderr
