"""Run an ASGI app with uvicorn in a background thread, on loopback, for tests and local stacks."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any, Literal

import uvicorn

__all__ = ["ServerThread"]

logger = logging.getLogger(__name__)


class ServerThread:
    """An ASGI app served by uvicorn on ``host:port`` from a daemon thread.

    ``port=0`` picks a free port; the socket is bound here, so :attr:`port` and :attr:`url` are
    known before the server runs. :meth:`stop` kills the server even with requests in flight
    (streams included): the listening socket closes at once and every open connection is
    aborted, as when a process dies. A new ``ServerThread(app, port=old.port)`` can then take
    the same port again. Requests whose connection was aborted get ``graceful_timeout_s`` to
    notice and end before they are cancelled; then the app's lifespan shutdown runs.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        lifespan: Literal["auto", "on", "off"] = "auto",
        graceful_timeout_s: float = 2.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app,
            log_config=None,
            log_level=log_level,
            access_log=False,
            lifespan=lifespan,
            proxy_headers=False,
            server_header=False,
            date_header=False,
        )
        self._graceful_timeout_s = graceful_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("this ServerThread was already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._run, name=f"server-{self.port}", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} failed to start") from self._error
            if time.monotonic() > end:
                self.stop()
                raise TimeoutError(f"server on {self.url} did not start in {timeout_s}s")
            time.sleep(0.002)
        return self

    def _run(self) -> None:
        server, sock = self._server, self._sock
        assert server is not None and sock is not None
        try:
            with asyncio.Runner(loop_factory=self._config.get_loop_factory()) as runner:
                runner.run(self._serve(server, sock))
        except BaseException as exc:  # reported by start(); a thread cannot raise to its parent
            self._error = exc
            logger.exception("server on %s crashed", self.url)
        finally:
            sock.close()

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        # uvicorn's own serve() polls for exit every 0.1 s and sleeps 0.1 s more on shutdown;
        # driving startup and shutdown here makes stop() immediate.
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        config = server.config
        if not config.loaded:
            config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        try:
            await self._stopping.wait()
        finally:
            self._close_connections(server)
            tasks = list(server.server_state.tasks)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self._graceful_timeout_s)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)
            for listener in server.servers:
                await listener.wait_closed()
            await server.lifespan.shutdown()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop now: stop listening, abort open connections, shut down, join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if thread.is_alive() and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._kill)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("server on %s did not stop within %ss", self.url, timeout_s)

    def _kill(self) -> None:
        server = self._server
        assert server is not None
        server.should_exit = True
        self._close_connections(server)
        if self._stopping is not None:
            self._stopping.set()

    @staticmethod
    def _close_connections(server: uvicorn.Server) -> None:
        for listener in getattr(server, "servers", []):
            listener.close()
        for conn in list(server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerThread({self.url}, running={self.running})"
