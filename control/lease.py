"""When to renew our lease (flannel's ``CompleteLease`` timer, facts §1.4).

Pure: the clock is a parameter (``now``, seconds on any monotonic-or-wall scale the
caller uses consistently with ``expiration``).

* a lease lives ``LEASE_TTL_S`` (24 h, etcd ``Grant(86400)``);
* renew at ``expiration − margin`` (margin: ``--subnet-lease-renew-margin``,
  minutes, default 60, valid 1..1439), or right away if that moment has passed;
* after a failed renewal, try again in ``RENEW_RETRY_S`` (60 s);
* a PUT seen on our own key updates the expiration (and so the schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from control.config import ConfigError

__all__ = [
    "DEFAULT_RENEW_MARGIN_MIN",
    "LEASE_TTL_S",
    "MAX_RENEW_MARGIN_MIN",
    "MIN_RENEW_MARGIN_MIN",
    "RENEW_RETRY_S",
    "RenewSchedule",
    "validate_renew_margin",
]

LEASE_TTL_S = 86400
RENEW_RETRY_S = 60.0
DEFAULT_RENEW_MARGIN_MIN = 60
MIN_RENEW_MARGIN_MIN = 1
MAX_RENEW_MARGIN_MIN = 1439


def validate_renew_margin(minutes: int) -> int:
    """Check ``--subnet-lease-renew-margin`` (minutes, 1..1439); returns it."""
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        raise ConfigError(
            f"subnet-lease-renew-margin: must be a whole number of minutes, got {minutes!r}"
        )
    if not MIN_RENEW_MARGIN_MIN <= minutes <= MAX_RENEW_MARGIN_MIN:
        raise ConfigError(
            f"subnet-lease-renew-margin: {minutes} minutes is out of range "
            f"{MIN_RENEW_MARGIN_MIN}..{MAX_RENEW_MARGIN_MIN}"
        )
    return minutes


@dataclass(frozen=True)
class RenewSchedule:
    """The renew timer as an immutable state: ``due_at`` is when to renew next
    (None until a lease is known). Each ``on_*`` returns the next state."""

    margin_s: float
    due_at: float | None = None

    @classmethod
    def from_minutes(cls, minutes: int = DEFAULT_RENEW_MARGIN_MIN) -> RenewSchedule:
        """A schedule for ``--subnet-lease-renew-margin`` minutes (validated)."""
        return cls(margin_s=validate_renew_margin(minutes) * 60.0)

    def next_renew_at(self, expiration: float, now: float) -> float:
        """``expiration − margin``, or ``now`` if that is already past."""
        return max(expiration - self.margin_s, now)

    def on_lease(self, expiration: float, now: float) -> RenewSchedule:
        """A lease with this expiration was acquired, renewed, or seen on our key."""
        return replace(self, due_at=self.next_renew_at(expiration, now))

    on_acquired = on_lease
    on_renewed = on_lease
    on_own_put = on_lease

    def on_error(self, now: float) -> RenewSchedule:
        """The renewal failed: try again in a minute."""
        return replace(self, due_at=now + RENEW_RETRY_S)

    def is_due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at

    def delay(self, now: float) -> float | None:
        """Seconds to sleep before renewing (0 if due; None if no lease is known)."""
        if self.due_at is None:
            return None
        return max(0.0, self.due_at - now)
