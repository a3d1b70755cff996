"""The circuit breaker's state machine, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from foveal.pools.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failures):
        assert breaker.acquire()
        breaker.record_failure()


def test_closed_until_n_consecutive_failures(clock: FakeClock) -> None:
    b = CircuitBreaker(3, 5.0, clock=clock)
    assert b.state == "closed"
    assert b.record_failure() is False
    assert b.record_failure() is False
    assert b.allows() and b.state == "closed"
    assert b.record_failure() is True
    assert b.state == "open"
    assert not b.allows()
    assert not b.acquire()


def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    b = CircuitBreaker(3, 5.0, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()
    assert b.consecutive_failures == 0
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"


def test_open_half_opens_after_reset_with_a_single_trial(clock: FakeClock) -> None:
    b = CircuitBreaker(2, 5.0, clock=clock)
    _open(b)
    clock.now += 4.99
    assert not b.acquire()
    assert b.retry_after_s() == pytest.approx(0.01)
    clock.now += 0.01
    assert b.state == "half_open"
    assert b.allows()
    assert b.acquire()  # the trial
    assert not b.allows()
    assert not b.acquire()  # only one trial at a time
    assert b.state == "half_open"


def test_trial_success_closes(clock: FakeClock) -> None:
    b = CircuitBreaker(2, 5.0, clock=clock)
    _open(b)
    clock.now += 5.0
    assert b.acquire()
    assert b.record_success() is True
    assert b.state == "closed"
    assert b.acquire() and b.acquire()  # closed: no limit
    assert b.retry_after_s() == 0.0


def test_trial_failure_reopens_for_a_full_reset_period(clock: FakeClock) -> None:
    b = CircuitBreaker(2, 5.0, clock=clock)
    _open(b)
    clock.now += 6.0
    assert b.acquire()
    assert b.record_failure() is True
    assert b.state == "open"
    assert b.retry_after_s() == pytest.approx(5.0)
    clock.now += 4.0
    assert not b.acquire()
    clock.now += 1.0
    assert b.acquire()


def test_release_gives_the_trial_back_without_a_verdict(clock: FakeClock) -> None:
    b = CircuitBreaker(1, 5.0, clock=clock)
    _open(b)
    clock.now += 5.0
    assert b.acquire()
    b.release()
    assert b.state == "half_open"
    assert b.acquire()  # a new trial may go


def test_retry_after_counts_down(clock: FakeClock) -> None:
    b = CircuitBreaker(1, 3.0, clock=clock)
    assert b.retry_after_s() == 0.0
    _open(b)
    assert b.retry_after_s() == pytest.approx(3.0)
    clock.now += 2.0
    assert b.retry_after_s() == pytest.approx(1.0)
    clock.now += 2.0
    assert b.retry_after_s() == 0.0


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0.0)
