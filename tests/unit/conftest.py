"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loopback_helpers import Loopback

from bench.trace_cost import loopback_engine


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    engine, feeder, sockets = loopback_engine()
    sink, sender, device, _ = sockets
    sink.setblocking(False)
    yield Loopback(engine, feeder, device, sender, sink)
    for s in sockets:
        s.close()
