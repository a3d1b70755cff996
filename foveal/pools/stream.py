"""A streamed chat completion from one pool endpoint: the parsed ``data:`` chunks of its SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp

from foveal.errors import PoolError, PoolTimeout
from foveal.metrics import POOL_ERRORS_TOTAL

if TYPE_CHECKING:
    from prometheus_client import Counter

    from foveal.pools.health import EndpointState

__all__ = ["PoolStream", "error_counter"]

logger = logging.getLogger(__name__)

try:  # optional, faster
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads

_monotonic = time.monotonic
_DONE = b"[DONE]"
_errors: dict[tuple[str, str], Counter] = {}


def error_counter(tier: str, kind: str) -> Counter:
    """The ``foveal_pool_errors_total`` child for ``tier`` and ``kind`` (cached)."""
    key = (tier, kind)
    child = _errors.get(key)
    if child is None:
        child = _errors[key] = POOL_ERRORS_TOTAL.labels(tier, kind)
    return child


class PoolStream:
    """Iterate it for each parsed chunk; it ends at ``data: [DONE]``.

    A broken upstream raises :class:`PoolError` from the iterator, the deadline passing raises
    :class:`PoolTimeout`. Always end with :meth:`aclose` (or use ``async with``): it closes the
    upstream connection when the stream did not finish, so the pool sees the disconnect.
    Cancelling a pending read closes the stream the same way.
    """

    __slots__ = (
        "_done",
        "_on_open",
        "_resp",
        "_state",
        "attempts",
        "endpoint",
        "pool_seconds",
        "tier",
    )

    def __init__(
        self,
        tier: str,
        endpoint: str,
        attempts: int,
        resp: aiohttp.ClientResponse,
        state: EndpointState,
        pool_seconds: float,
        on_breaker_open: Callable[[], None] | None = None,
    ) -> None:
        self.tier = tier
        self.endpoint = endpoint
        self.attempts = attempts
        self.pool_seconds = pool_seconds  # time spent waiting on the pool so far
        self._resp = resp
        self._state = state
        self._on_open = on_breaker_open
        self._done = False

    def __aiter__(self) -> PoolStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        content = self._resp.content
        while True:
            t0 = _monotonic()
            try:
                line = await content.readline()
            except asyncio.CancelledError:
                self._end(failed=False)  # the reader went away: so does the upstream
                raise
            except TimeoutError:
                self._end(failed=False)
                error_counter(self.tier, "timeout").inc()
                raise PoolTimeout(f"stream from tier {self.tier} passed the deadline") from None
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
            finally:
                self.pool_seconds += _monotonic() - t0
            if not line:
                self._fail("the stream ended before [DONE]")
            if not line.startswith(b"data:"):
                continue  # blank separator lines, comments, event names
            data = line[5:].strip()
            if data == _DONE:
                self._end(failed=False, finished=True)
                raise StopAsyncIteration
            try:
                chunk = _loads(data)
            except ValueError:
                self._fail("a chunk that is not JSON")
            if not isinstance(chunk, dict):
                self._fail("a chunk that is not a JSON object")
            return chunk

    async def aclose(self) -> None:
        """Stop reading; an unfinished upstream response is closed (the pool sees it)."""
        self._end(failed=False)

    async def __aenter__(self) -> PoolStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._end(failed=False)

    @property
    def finished(self) -> bool:
        """Whether the stream ended (at ``[DONE]``, by error or by :meth:`aclose`)."""
        return self._done

    def _fail(self, why: str) -> NoReturn:
        self._end(failed=True)
        error_counter(self.tier, "protocol").inc()
        logger.warning("stream from %s (tier %s) broke: %s", self.endpoint, self.tier, why)
        raise PoolError(f"the pool stream broke: {why}")

    def _end(self, *, failed: bool, finished: bool = False) -> None:
        if self._done:
            return
        self._done = True
        state = self._state
        state.inflight -= 1
        if finished:
            self._resp.release()  # keeps the connection when the body is complete
        else:
            self._resp.close()  # drops the connection: the pool sees the disconnect
        if failed and state.breaker.record_failure() and self._on_open is not None:
            self._on_open()
