"""A TCP proxy in front of Redis that can lose one reply: the command reaches Redis and runs, its answer never arrives.

That is what a connection dropped at the wrong moment does (Redis stopping right after a
command, a cut network, a socket timeout): the caller cannot tell whether its command ran.
The proxy runs on the test's event loop, so a test must not block that loop while services
talk through it (wait for them in a thread).
"""

from __future__ import annotations

import asyncio


class LossyProxy:
    """Forwards 127.0.0.1:<port> to Redis on ``target_port``.

    ``arm(marker)`` loses the reply to the next command containing ``marker`` (and closes its connection).
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0
        #: Set once a command with the marker ran in Redis and its reply was thrown away.
        self.fired = asyncio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every connection; returns once every handler has ended."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def arm(self, marker: bytes) -> None:
        self.fired.clear()
        self._marker = marker

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            self._handlers.discard(handler)
            return
        self._writers.add(server_w)
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(1 << 16):
                marker = self._marker
                if marker is not None and marker in data:
                    self._marker = None
                    cut.set()  # before Redis can answer: the answer is never forwarded
                    client_w.transport.abort()  # the caller sees "Connection closed by server"
                    server_w.write(data)
                    await server_w.drain()
                    return
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(1 << 16):
                if cut.is_set():
                    self.fired.set()  # Redis ran the command and answered; nobody will hear it
                    return
                client_w.write(data)
                await client_w.drain()

        up, down = asyncio.create_task(upstream()), asyncio.create_task(downstream())
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            if up.done() and cut.is_set():
                await asyncio.wait([down], timeout=5)  # the reply: proof that the command ran
        finally:
            for pump in (up, down):
                pump.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.transport.abort()
                self._writers.discard(writer)
            self._handlers.discard(handler)
