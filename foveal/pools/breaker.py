"""A per-endpoint circuit breaker.

closed --(``failures`` consecutive failures)--> open --(``reset_s`` later)--> half-open, where
exactly one trial request may go: its success closes the breaker, its failure reopens it.
An attempt that ends without saying anything about the endpoint (cancelled, rate limited)
gives its trial slot back with :meth:`CircuitBreaker.release`.

The clock is injectable so unit tests drive time by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]

_CLOSED: BreakerState = "closed"
_OPEN: BreakerState = "open"
_HALF_OPEN: BreakerState = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one endpoint and decides whether a request may go."""

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_state",
        "_trial",
        "failures",
        "name",
        "reset_s",
    )

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        if reset_s <= 0:
            raise ValueError("reset_s must be > 0")
        self.failures = failures
        self.reset_s = reset_s
        self.name = name
        self._clock = clock
        self._state: BreakerState = _CLOSED
        self._failures = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._trial = False  # a half-open trial request is in flight

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose wait is over reports ``half_open``."""
        if self._state == _OPEN and self._clock() >= self._opened_at + self.reset_s:
            return _HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allows(self) -> bool:
        """Whether a request could go now (does not take the half-open trial slot)."""
        state = self._state
        if state == _CLOSED:
            return True
        if state == _OPEN:
            return self._clock() >= self._opened_at + self.reset_s
        return not self._trial

    def acquire(self) -> bool:
        """Take permission for one request; in half-open this takes the single trial slot.

        Every ``True`` must be followed by exactly one of :meth:`record_success`,
        :meth:`record_failure` or :meth:`release`.
        """
        state = self._state
        if state == _CLOSED:
            return True
        if state == _OPEN:
            if self._clock() < self._opened_at + self.reset_s:
                return False
            self._state = _HALF_OPEN
            logger.info("circuit breaker %s half-open: one trial request", self.name)
        if self._trial:
            return False
        self._trial = True
        return True

    def record_success(self) -> bool:
        """The endpoint answered; returns whether this closed a breaker that was not closed."""
        self._failures = 0
        self._trial = False
        if self._state == _CLOSED:
            return False
        logger.info("circuit breaker %s closed", self.name)
        self._state = _CLOSED
        return True

    def record_failure(self) -> bool:
        """The endpoint failed; returns whether this (re)opened the breaker."""
        self._trial = False
        state = self._state
        if state == _CLOSED:
            self._failures += 1
            if self._failures < self.failures:
                return False
            logger.warning(
                "circuit breaker %s open after %d consecutive failures", self.name, self._failures
            )
        elif state == _HALF_OPEN:
            logger.warning("circuit breaker %s trial failed: open again", self.name)
        self._state = _OPEN
        self._opened_at = self._clock()
        return state != _OPEN

    def release(self) -> None:
        """The attempt ended without a verdict on the endpoint: give the trial slot back."""
        self._trial = False

    def retry_after_s(self) -> float:
        """Seconds until a request may go (0 when one may go now)."""
        state = self._state
        if state == _OPEN:
            return max(0.0, self._opened_at + self.reset_s - self._clock())
        if state == _HALF_OPEN and self._trial:
            return self.reset_s  # unknown: the trial's outcome decides
        return 0.0

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state}, failures={self._failures})"
