"""A process starting while its broker or database is down waits for them (schema/startup.py);
other start-up failures are not waited on."""

from __future__ import annotations

import pytest

from capworks.schema.errors import CapworksError, Code, Unreachable
from capworks.schema.startup import wait_until_reachable


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_an_unreachable_service_is_tried_again_until_it_answers() -> None:
    t = FakeClock()
    answers: list[object] = [Unreachable(Code.STORAGE_UNAVAILABLE, "refused")] * 3 + ["ok"]

    def attempt() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert wait_until_reachable(attempt, "the broker", 60, sleep=t.sleep, clock=t.clock) == "ok"
    assert len(t.sleeps) == 3 and all(0.1 <= s <= 10 for s in t.sleeps)


def test_waiting_stops_at_the_deadline_with_the_last_error() -> None:
    t = FakeClock()
    calls = 0

    def attempt() -> None:
        nonlocal calls
        calls += 1
        raise Unreachable(Code.DATABASE_UNAVAILABLE, f"refused {calls}")

    with pytest.raises(Unreachable, match=r"refused \d+"):
        wait_until_reachable(attempt, "the database", 30, sleep=t.sleep, clock=t.clock)
    assert t.now == pytest.approx(30)  # the last sleep is cut to the time left
    assert calls >= 4


def test_other_failures_are_not_waited_on() -> None:
    t = FakeClock()

    def attempt() -> None:
        raise CapworksError(Code.DATABASE_UNAVAILABLE, "bad database URL 'x://'")

    with pytest.raises(CapworksError, match="bad database URL"):
        wait_until_reachable(attempt, "the database", 60, sleep=t.sleep, clock=t.clock)
    assert t.sleeps == []


def test_no_wait_configured_fails_at_once() -> None:
    t = FakeClock()

    def attempt() -> None:
        raise Unreachable(Code.STORAGE_UNAVAILABLE, "refused")

    with pytest.raises(Unreachable):
        wait_until_reachable(attempt, "the broker", 0, sleep=t.sleep, clock=t.clock)
    assert t.sleeps == []
