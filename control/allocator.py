"""Choosing this node's subnet: flannel's ``tryAcquireLease`` as pure data.

Pure: no I/O, no clock; randomness comes in as a ``random.Random``.

flannel's decision (pkg/subnet/etcd/local_manager.go, facts §1.4):

1. a lease whose PublicIP is ours and that fits the config is reused (plain Put
   with a new 24 h lease); one that does not fit is deleted;
2. else the previous subnet from the old subnet.env (FLANNEL_SUBNET) is tried, if
   it is free and fits;
3. else up to the first 100 free subnets in SubnetMin..SubnetMax are collected
   and one is picked uniformly at random (created with CAS);
4. none free: out of subnets.

The edge carries out the plan (delete, then Put or CAS-create) and, on a lost
CAS race, lists again and plans again.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from control.config import NetworkConfig
from control.model import Lease

__all__ = [
    "FREE_WINDOW",
    "AcquireAction",
    "AcquirePlan",
    "all_subnets",
    "choose_ipv6_subnet",
    "choose_subnet",
    "ipv6_subnet_from_env_hint",
    "is_compatible",
    "is_ipv6_compatible",
    "plan_acquire",
    "subnet_from_env_hint",
]

FREE_WINDOW = 100
"""flannel collects at most this many free subnets before picking one at random."""


# --------------------------------------------------------------------------------------
# Enumerating and choosing


def all_subnets(cfg: NetworkConfig) -> Iterator[IPv4Network]:
    """Every candidate lease subnet, SubnetMin..SubnetMax inclusive, in order."""
    size = cfg.subnet_size
    for start in range(int(cfg.subnet_min), int(cfg.subnet_max) + 1, size):
        yield IPv4Network((start, cfg.subnet_len))


def _merged_intervals(nets: Iterable[IPv4Network | IPv6Network]) -> tuple[list[int], list[int]]:
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in nets)
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi in spans:
        if ends and lo <= ends[-1] + 1:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


def _free_starts(
    lo: int, hi: int, size: int, taken: Iterable[IPv4Network | IPv6Network], limit: int
) -> list[int]:
    """Start addresses of the first ``limit`` subnets of ``size`` in [lo, hi] that
    overlap nothing in ``taken`` (flannel's Overlaps test), skipping taken runs whole."""
    starts, ends = _merged_intervals(taken)
    free: list[int] = []
    cur = lo
    while cur <= hi and len(free) < limit:
        last = cur + size - 1
        i = bisect_right(starts, last) - 1
        if i >= 0 and ends[i] >= cur:
            # jump to the first aligned subnet after the taken run
            cur = ((ends[i] + 1 + size - 1) // size) * size
            continue
        free.append(cur)
        cur += size
    return free


def choose_subnet(
    cfg: NetworkConfig, taken: set[IPv4Network], rng: random.Random
) -> IPv4Network | None:
    """flannel's ``allocateSubnet``: collect up to the first 100 subnets from SubnetMin
    on that overlap no taken subnet, pick one uniformly; None when there is none."""
    free = _free_starts(
        int(cfg.subnet_min), int(cfg.subnet_max), cfg.subnet_size, taken, FREE_WINDOW
    )
    if not free:
        return None
    return IPv4Network((free[rng.randrange(len(free))], cfg.subnet_len))


def choose_ipv6_subnet(
    cfg: NetworkConfig, taken: set[IPv6Network], rng: random.Random
) -> IPv6Network | None:
    """The IPv6 twin of :func:`choose_subnet` (dual stack only; None if IPv6 is off)."""
    if (
        not cfg.enable_ipv6
        or cfg.ipv6_subnet_len is None
        or cfg.ipv6_subnet_min is None
        or cfg.ipv6_subnet_max is None
    ):
        return None
    size = 1 << (128 - cfg.ipv6_subnet_len)
    free = _free_starts(
        int(cfg.ipv6_subnet_min), int(cfg.ipv6_subnet_max), size, taken, FREE_WINDOW
    )
    if not free:
        return None
    return IPv6Network((free[rng.randrange(len(free))], cfg.ipv6_subnet_len))


# --------------------------------------------------------------------------------------
# Hints and compatibility


def subnet_from_env_hint(value: str | None) -> IPv4Network | None:
    """The previous subnet from FLANNEL_SUBNET: ``10.5.72.1/24`` → ``10.5.72.0/24``.

    A comma-separated list (flannel: "more than 1 entry"), an empty value or garbage
    gives None.
    """
    if not value:
        return None
    value = value.strip()
    if "," in value or "/" not in value:
        return None
    try:
        return IPv4Network(value, strict=False)
    except ValueError:
        return None


def ipv6_subnet_from_env_hint(value: str | None) -> IPv6Network | None:
    """The previous IPv6 subnet from FLANNEL_IPV6_SUBNET (same rules)."""
    if not value:
        return None
    value = value.strip()
    if "," in value or "/" not in value:
        return None
    try:
        return IPv6Network(value, strict=False)
    except ValueError:
        return None


def is_compatible(cfg: NetworkConfig, subnet: IPv4Network) -> bool:
    """flannel's ``isSubnetConfigCompat``: starts within SubnetMin..SubnetMax and has
    the configured SubnetLen."""
    return (
        cfg.subnet_min <= subnet.network_address <= cfg.subnet_max
        and subnet.prefixlen == cfg.subnet_len
    )


def is_ipv6_compatible(cfg: NetworkConfig, subnet_v6: IPv6Network | None) -> bool:
    """flannel's ``isIPv6SubnetConfigCompat``: without IPv6 the lease must have no
    IPv6 subnet; with it, the IPv6 subnet must be in range with the right length."""
    if not cfg.enable_ipv6:
        return subnet_v6 is None
    if subnet_v6 is None or cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        return False
    return (
        cfg.ipv6_subnet_min <= subnet_v6.network_address <= cfg.ipv6_subnet_max
        and subnet_v6.prefixlen == cfg.ipv6_subnet_len
    )


# --------------------------------------------------------------------------------------
# The plan


class AcquireAction(Enum):
    REUSE = "reuse"
    """Put our attrs on an existing lease of ours (``plan.reuse``) with a fresh TTL."""
    CREATE = "create"
    """CAS-create ``plan.subnet``/``plan.subnet_v6`` (Version(key) == 0)."""
    EXHAUSTED = "exhausted"
    """No free subnet: ``plan.error`` says so."""


@dataclass(frozen=True)
class AcquirePlan:
    """What to do to get a lease. Carry out ``delete`` first (in order), then
    ``action``. ``reason`` is a log line; ``error`` is set only for EXHAUSTED."""

    action: AcquireAction
    subnet: IPv4Network | None = None
    subnet_v6: IPv6Network | None = None
    reuse: Lease | None = None
    delete: tuple[Lease, ...] = ()
    from_hint: bool = False
    free_candidates: int = 0
    reason: str = ""
    error: str | None = None


def plan_acquire(
    cfg: NetworkConfig,
    existing: list[Lease],
    my_public_ip: IPv4Address,
    env_hint: IPv4Network | None,
    rng: random.Random,
    env_hint_v6: IPv6Network | None = None,
) -> AcquirePlan:
    """flannel's ``tryAcquireLease`` decision, as data.

    ``existing`` is the current listing of ``<prefix>/subnets``; ``env_hint`` the
    previous subnet from subnet.env (see :func:`subnet_from_env_hint`).
    """
    mine = [lease for lease in existing if lease.attrs.public_ip == my_public_ip]
    fits = [lease for lease in mine if _fits(cfg, lease)]
    stale = tuple(lease for lease in mine if not _fits(cfg, lease))

    if fits:
        chosen = fits[0]
        return AcquirePlan(
            action=AcquireAction.REUSE,
            subnet=chosen.subnet,
            subnet_v6=chosen.subnet_v6,
            reuse=chosen,
            delete=stale,
            reason=(
                f"found lease {_fmt(chosen.subnet, chosen.subnet_v6)} for our public IP "
                f"{my_public_ip}, reusing"
            ),
        )

    # Leases we are about to delete no longer take space.
    stale_ids = {id(lease) for lease in stale}
    others = [lease for lease in existing if id(lease) not in stale_ids]
    taken4 = {lease.subnet for lease in others}
    taken6 = {lease.subnet_v6 for lease in others if lease.subnet_v6 is not None}
    stale_note = ""
    if stale:
        stale_note = (
            f"; deleting {len(stale)} lease(s) of ours that do not fit the config: "
            + ", ".join(_fmt(s.subnet, s.subnet_v6) for s in stale)
        )

    if (
        env_hint is not None
        and is_compatible(cfg, env_hint)
        and is_ipv6_compatible(cfg, env_hint_v6 if cfg.enable_ipv6 else None)
        and not any(env_hint.overlaps(t) for t in taken4)
        and not (
            cfg.enable_ipv6
            and env_hint_v6 is not None
            and any(env_hint_v6.overlaps(t) for t in taken6)
        )
    ):
        hint6 = env_hint_v6 if cfg.enable_ipv6 else None
        return AcquirePlan(
            action=AcquireAction.CREATE,
            subnet=env_hint,
            subnet_v6=hint6,
            delete=stale,
            from_hint=True,
            reason=f"previously leased subnet {_fmt(env_hint, hint6)} is free, reusing"
            + stale_note,
        )

    free4 = _free_starts(
        int(cfg.subnet_min), int(cfg.subnet_max), cfg.subnet_size, taken4, FREE_WINDOW
    )
    free6: list[int] = []
    if cfg.enable_ipv6 and free4:
        assert cfg.ipv6_subnet_len is not None
        assert cfg.ipv6_subnet_min is not None and cfg.ipv6_subnet_max is not None
        free6 = _free_starts(
            int(cfg.ipv6_subnet_min),
            int(cfg.ipv6_subnet_max),
            1 << (128 - cfg.ipv6_subnet_len),
            taken6,
            FREE_WINDOW,
        )
    if not free4 or (cfg.enable_ipv6 and not free6):
        if not free4:
            error = f"no free subnet in {cfg.subnet_min}..{cfg.subnet_max} ({len(existing)} leases)"
        else:
            error = (
                f"no free IPv6 subnet in {cfg.ipv6_subnet_min}..{cfg.ipv6_subnet_max} "
                f"({len(existing)} leases)"
            )
        return AcquirePlan(
            action=AcquireAction.EXHAUSTED,
            delete=stale,
            reason=error + stale_note,
            error=error,
        )
    # as flannel: the IPv4 pick is drawn first, then the IPv6 one
    sn4 = IPv4Network((free4[rng.randrange(len(free4))], cfg.subnet_len))
    sn6: IPv6Network | None = None
    if cfg.enable_ipv6:
        assert cfg.ipv6_subnet_len is not None
        sn6 = IPv6Network((free6[rng.randrange(len(free6))], cfg.ipv6_subnet_len))
    return AcquirePlan(
        action=AcquireAction.CREATE,
        subnet=sn4,
        subnet_v6=sn6,
        delete=stale,
        free_candidates=len(free4),
        reason=(
            f"picked {_fmt(sn4, sn6)} at random among {len(free4)} free subnet(s) in "
            f"{cfg.subnet_min}..{cfg.subnet_max}"
        )
        + stale_note,
    )


def _fits(cfg: NetworkConfig, lease: Lease) -> bool:
    return is_compatible(cfg, lease.subnet) and is_ipv6_compatible(cfg, lease.subnet_v6)


def _fmt(subnet: IPv4Network, subnet_v6: IPv6Network | None) -> str:
    return str(subnet) if subnet_v6 is None else f"{subnet} + {subnet_v6}"
