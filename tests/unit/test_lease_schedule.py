"""control/lease.py: the renew schedule (time is a parameter; nothing sleeps)."""

from __future__ import annotations

import pytest

from control.config import ConfigError
from control.lease import (
    DEFAULT_RENEW_MARGIN_MIN,
    LEASE_TTL_S,
    RENEW_RETRY_S,
    RenewSchedule,
    validate_renew_margin,
)


def test_constants() -> None:
    assert LEASE_TTL_S == 86400
    assert RENEW_RETRY_S == 60
    assert DEFAULT_RENEW_MARGIN_MIN == 60


def test_next_renew_at() -> None:
    s = RenewSchedule(margin_s=3600)
    now = 1_000_000.0
    assert s.next_renew_at(now + LEASE_TTL_S, now) == now + LEASE_TTL_S - 3600
    assert s.next_renew_at(now + 10, now) == now  # margin already past: renew now
    assert s.next_renew_at(now - 50, now) == now


def test_state_machine() -> None:
    s = RenewSchedule.from_minutes(60)
    assert s.margin_s == 3600
    assert s.due_at is None and not s.is_due(0.0) and s.delay(0.0) is None

    t0 = 500.0
    s = s.on_acquired(t0 + LEASE_TTL_S, t0)
    assert s.due_at == t0 + LEASE_TTL_S - 3600
    assert s.delay(t0) == LEASE_TTL_S - 3600
    assert not s.is_due(t0)

    t1 = s.due_at
    assert s.is_due(t1) and s.delay(t1) == 0
    s = s.on_error(t1)
    assert s.due_at == t1 + 60
    assert not s.is_due(t1 + 59.9) and s.is_due(t1 + 60)

    t2 = t1 + 60
    s = s.on_renewed(t2 + LEASE_TTL_S, t2)
    assert s.due_at == t2 + LEASE_TTL_S - 3600

    # someone else Put our key (or the watch saw our own renewal): follow its expiry
    s = s.on_own_put(t2 + 7200, t2)
    assert s.due_at == t2 + 3600


def test_schedule_is_immutable() -> None:
    s = RenewSchedule(60.0)
    s2 = s.on_error(10.0)
    assert s.due_at is None and s2.due_at == 70.0


@pytest.mark.parametrize("minutes", [1, 60, 1439])
def test_validate_renew_margin_ok(minutes: int) -> None:
    assert validate_renew_margin(minutes) == minutes


@pytest.mark.parametrize("minutes", [0, -5, 1440, 100000, 1.5, True, "60"])
def test_validate_renew_margin_bad(minutes: object) -> None:
    with pytest.raises(ConfigError, match="subnet-lease-renew-margin"):
        validate_renew_margin(minutes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RenewSchedule.from_minutes(minutes)  # type: ignore[arg-type]
