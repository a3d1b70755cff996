"""Per-endpoint state (health, breaker, requests in flight) and the background health checks.

State is keyed by endpoint URL, so a catalog swap keeps the state of the endpoints that stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp

from foveal.pools.breaker import CircuitBreaker

__all__ = ["EndpointState", "EndpointStates", "check_endpoints", "health_loop", "probe"]

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class EndpointState:
    url: str
    breaker: CircuitBreaker
    healthy: bool = True  # new endpoints start healthy
    inflight: int = 0

    @property
    def available(self) -> bool:
        """Healthy, and its breaker lets a request go."""
        return self.healthy and self.breaker.allows()


class EndpointStates:
    """The state of every endpoint the client has seen, by URL."""

    __slots__ = ("_by_url", "_clock", "_failures", "_reset_s")

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._by_url: dict[str, EndpointState] = {}
        self._failures = failures
        self._reset_s = reset_s
        self._clock = clock

    def get(self, url: str) -> EndpointState:
        """The state of ``url``, created (healthy, breaker closed) on first sight."""
        state = self._by_url.get(url)
        if state is None:
            breaker = CircuitBreaker(self._failures, self._reset_s, clock=self._clock, name=url)
            state = self._by_url[url] = EndpointState(url, breaker)
        return state

    def peek(self, url: str) -> EndpointState | None:
        return self._by_url.get(url)

    def prune(self, keep: Iterable[str]) -> None:
        """Forget endpoints that left the catalog (requests in flight keep their reference)."""
        keep = set(keep)
        for url in [u for u in self._by_url if u not in keep]:
            del self._by_url[url]

    def __len__(self) -> int:
        return len(self._by_url)


async def probe(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str | None:
    """``GET {url}/health``; ``None`` when it answered 200, else why not."""
    try:
        async with session.get(
            url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            if resp.status == 200:
                return None
            return f"HTTP {resp.status}"
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def check_endpoints(
    session: aiohttp.ClientSession, states: Iterable[EndpointState], timeout_s: float
) -> None:
    """Probe every endpoint at once and mark each healthy or not."""
    states = list(states)
    errors = await asyncio.gather(*(probe(session, s.url, timeout_s) for s in states))
    for state, error in zip(states, errors, strict=True):
        if error is None:
            if not state.healthy:
                logger.info("pool endpoint %s healthy again", state.url)
            state.healthy = True
        else:
            if state.healthy:
                logger.warning("pool endpoint %s unhealthy: %s", state.url, error)
            state.healthy = False


async def health_loop(check: Callable[[], Awaitable[None]], interval_s: float) -> None:
    """Run ``check`` every ``interval_s`` (first after one interval: endpoints start healthy)
    until cancelled; errors are logged."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await check()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("pool health check failed")
