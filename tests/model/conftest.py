"""What the model checks share: the real Redis their Redis variants run on (a fresh
key prefix per example), and hypothesis's settings."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine

import taskd
from taskd.testing import FakeClock

from ..conftest import Engine
from ..redis_server import RedisServer

T = TypeVar("T")
#: No cancel grace within a run (a cancelling task whose worker never confirms becomes
#: cancelled; tests/test_tracker.py covers it): a grace longer than any run's clock.
GRACE = 1e7

#: The session's Redis URL, once the fixture below has run.
REDIS: list[str] = []


@pytest.fixture(autouse=True, scope="package")
def _redis_url(redis_server: RedisServer) -> None:
    REDIS[:] = [redis_server.url]


def model_settings(examples: int, steps: int) -> settings:
    """A state machine's settings: ``examples`` runs of up to ``steps`` steps, no
    deadline (a Redis round trip is slow next to memory)."""
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class TrackerMachine(RuleBasedStateMachine):
    """A state machine driving a real tracker on its own event loop, with a fake
    clock; ``engine`` picks the engine (memory here, Redis in a subclass)."""

    def __init__(self, retention: taskd.Retention) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        try:
            self.tracker = taskd.Tracker(
                retention=retention, clock=self.clock, cancel_grace=GRACE, **self.engine()
            )
            self.run(self.tracker.__aenter__())
        except BaseException:
            # hypothesis calls teardown only on a machine that was built: a loop left
            # open here would be collected later, in another test, as a ResourceWarning
            self.loop.close()
            raise

    def engine(self) -> Engine:
        return {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.tracker.aclose())
        finally:
            self.loop.close()
