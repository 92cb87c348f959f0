"""control/allocator.py: subnet choice and flannel's tryAcquireLease plan."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.allocator import (
    FREE_WINDOW,
    AcquireAction,
    all_subnets,
    choose_ipv6_subnet,
    choose_subnet,
    ipv6_subnet_from_env_hint,
    is_compatible,
    is_ipv6_compatible,
    plan_acquire,
    subnet_from_env_hint,
)
from control.config import NetworkConfig, parse_network_config
from control.model import Lease, LeaseAttrs

ME = IPv4Address("192.168.1.10")


def cfg(network: str = "10.244.0.0/16", **extra: object) -> NetworkConfig:
    return parse_network_config(json.dumps({"Network": network, **extra}))


def lease(subnet: str, ip: str = "192.168.1.99", v6: str | None = None) -> Lease:
    return Lease(
        IPv4Network(subnet),
        IPv6Network(v6) if v6 else None,
        LeaseAttrs(IPv4Address(ip)),
        expiration=1000.0,
        etcd_lease_id=1,
    )


# ------------------------------------------------------------------ enumeration


def test_all_subnets_16() -> None:
    subnets = list(all_subnets(cfg()))
    assert len(subnets) == 255
    assert subnets[0] == IPv4Network("10.244.1.0/24")
    assert subnets[-1] == IPv4Network("10.244.255.0/24")


def test_all_subnets_small_network() -> None:
    assert [str(s) for s in all_subnets(cfg("10.0.0.0/24"))] == [
        "10.0.0.64/26",
        "10.0.0.128/26",
        "10.0.0.192/26",
    ]


# ------------------------------------------------------------------ choose_subnet


def test_choose_subnet_seeded_distinct_picks_within_first_window() -> None:
    c = cfg("10.0.0.0/8")  # 65535 candidates
    rng = random.Random(1234)
    window = set(list(all_subnets(c))[:FREE_WINDOW])
    picks = [choose_subnet(c, set(), rng) for _ in range(50)]
    assert all(p in window for p in picks)
    assert len(set(picks)) > 20  # uniform over 100: many distinct picks


def test_choose_subnet_is_deterministic_for_a_seed() -> None:
    c = cfg()
    a = [choose_subnet(c, set(), random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_choose_subnet_skips_taken_and_window_moves() -> None:
    c = cfg("10.0.0.0/8")
    all_ = list(all_subnets(c))
    taken = set(all_[:150])
    window = set(all_[150 : 150 + FREE_WINDOW])
    rng = random.Random(5)
    for _ in range(200):
        p = choose_subnet(c, taken, rng)
        assert p in window


def test_choose_subnet_allocating_repeatedly_gives_distinct_subnets() -> None:
    c = cfg("10.0.0.0/24")  # 3 subnets
    rng = random.Random(0)
    taken: set[IPv4Network] = set()
    for _ in range(3):
        p = choose_subnet(c, taken, rng)
        assert p is not None and p not in taken
        taken.add(p)
    assert taken == set(all_subnets(c))
    assert choose_subnet(c, taken, rng) is None


def test_choose_subnet_overlap_not_equality() -> None:
    c = cfg("10.0.0.0/16")
    # a foreign /20 lease and a /28 inside 10.0.21.0/24 block those subnets
    taken = {IPv4Network("10.0.0.0/20"), IPv4Network("10.0.21.16/28")}
    rng = random.Random(3)
    seen = {choose_subnet(c, taken, rng) for _ in range(500)}
    assert IPv4Network("10.0.16.0/24") in seen
    for s in seen:
        assert s is not None
        assert not s.overlaps(IPv4Network("10.0.0.0/20"))
        assert s != IPv4Network("10.0.21.0/24")


def test_choose_subnet_uniform_over_window() -> None:
    c = cfg("10.0.0.0/8")
    rng = random.Random(42)
    counts: dict[IPv4Network, int] = {}
    for _ in range(10000):
        p = choose_subnet(c, set(), rng)
        assert p is not None
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) == FREE_WINDOW
    assert min(counts.values()) > 50 and max(counts.values()) < 160


def test_choose_ipv6_subnet() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    taken = {IPv6Network("fc00:0:0:1::/64"), IPv6Network("fc00:0:0:2::/63")}
    rng = random.Random(9)
    picks = {choose_ipv6_subnet(c, taken, rng) for _ in range(300)}
    assert all(p is not None and p.prefixlen == 64 for p in picks)
    assert not picks & {IPv6Network(f"fc00:0:0:{i}::/64") for i in (0, 1, 2, 3)}
    assert max(int(p.network_address) for p in picks if p) < int(
        IPv6Network("fc00:0:0:68::/64").network_address
    )
    assert choose_ipv6_subnet(cfg(), set(), rng) is None


def test_choose_ipv6_subnet_skips_a_huge_taken_block_quickly() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/32")
    taken = {IPv6Network("fc00::/33")}  # 2**31 candidate /64s taken
    p = choose_ipv6_subnet(c, taken, random.Random(1))
    assert p is not None and p.subnet_of(IPv6Network("fc00:0:8000::/33"))
    assert int(p.network_address) - int(IPv6Network("fc00:0:8000::/64").network_address) < (
        FREE_WINDOW << 64
    )


# ------------------------------------------------------------------ hints / compat


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.5.72.1/24", IPv4Network("10.5.72.0/24")),
        (" 10.5.72.1/24\n", IPv4Network("10.5.72.0/24")),
        ("10.244.3.129/25", IPv4Network("10.244.3.128/25")),
        ("10.5.72.1/24,10.6.0.1/24", None),
        ("10.5.72.1", None),
        ("garbage", None),
        ("", None),
        (None, None),
        ("fc00::1/64", None),
    ],
)
def test_subnet_from_env_hint(value: str | None, expected: IPv4Network | None) -> None:
    assert subnet_from_env_hint(value) == expected


def test_ipv6_subnet_from_env_hint() -> None:
    assert ipv6_subnet_from_env_hint("fc00:0:0:1::1/64") == IPv6Network("fc00:0:0:1::/64")
    assert ipv6_subnet_from_env_hint("fc00::1/64,fc01::1/64") is None
    assert ipv6_subnet_from_env_hint("10.0.0.1/24") is None
    assert ipv6_subnet_from_env_hint(None) is None


def test_is_compatible() -> None:
    c = cfg(SubnetMin="10.244.10.0", SubnetMax="10.244.20.0")
    assert is_compatible(c, IPv4Network("10.244.10.0/24"))
    assert is_compatible(c, IPv4Network("10.244.20.0/24"))
    assert not is_compatible(c, IPv4Network("10.244.9.0/24"))
    assert not is_compatible(c, IPv4Network("10.244.21.0/24"))
    assert not is_compatible(c, IPv4Network("10.244.10.0/25"))
    assert not is_compatible(c, IPv4Network("10.245.10.0/24"))


def test_is_ipv6_compatible() -> None:
    assert is_ipv6_compatible(cfg(), None)
    assert not is_ipv6_compatible(cfg(), IPv6Network("fc00:0:0:1::/64"))
    c6 = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    assert is_ipv6_compatible(c6, IPv6Network("fc00:0:0:1::/64"))
    assert not is_ipv6_compatible(c6, None)
    assert not is_ipv6_compatible(c6, IPv6Network("fc00::/64"))  # below IPv6SubnetMin
    assert not is_ipv6_compatible(c6, IPv6Network("fc00:0:0:1::/80"))


# ------------------------------------------------------------------ plan_acquire


def test_plan_reuse_our_lease() -> None:
    ours = lease("10.244.7.0/24", ip=str(ME))
    existing = [lease("10.244.1.0/24"), ours, lease("10.244.9.0/24")]
    plan = plan_acquire(cfg(), existing, ME, IPv4Network("10.244.50.0/24"), random.Random(0))
    assert plan.action is AcquireAction.REUSE
    assert plan.subnet == IPv4Network("10.244.7.0/24")
    assert plan.reuse is ours
    assert plan.delete == ()
    assert plan.error is None
    assert "reusing" in plan.reason


def test_plan_reuse_reservation() -> None:
    reserved = Lease(IPv4Network("10.244.7.0/24"), None, LeaseAttrs(ME))
    plan = plan_acquire(cfg(), [reserved], ME, None, random.Random(0))
    assert plan.action is AcquireAction.REUSE
    assert plan.reuse is not None and plan.reuse.is_reservation


def test_plan_deletes_incompatible_lease_then_uses_hint() -> None:
    old = lease("10.244.7.0/25", ip=str(ME))  # wrong SubnetLen
    plan = plan_acquire(cfg(), [old], ME, IPv4Network("10.244.42.0/24"), random.Random(0))
    assert plan.action is AcquireAction.CREATE
    assert plan.delete == (old,)
    assert plan.subnet == IPv4Network("10.244.42.0/24")
    assert plan.from_hint
    assert "deleting 1 lease" in plan.reason


def test_plan_deletes_out_of_range_lease_then_random() -> None:
    c = cfg(SubnetMin="10.244.10.0", SubnetMax="10.244.12.0")
    old = lease("10.244.3.0/24", ip=str(ME))
    plan = plan_acquire(c, [old, lease("10.244.10.0/24")], ME, None, random.Random(4))
    assert plan.action is AcquireAction.CREATE
    assert plan.delete == (old,)
    assert plan.subnet in {IPv4Network("10.244.11.0/24"), IPv4Network("10.244.12.0/24")}
    assert plan.free_candidates == 2
    assert not plan.from_hint


def test_plan_reuses_compatible_and_deletes_stale_duplicates_of_ours() -> None:
    stale = lease("10.244.7.0/25", ip=str(ME))
    good = lease("10.244.8.0/24", ip=str(ME))
    plan = plan_acquire(cfg(), [stale, good], ME, None, random.Random(0))
    assert plan.action is AcquireAction.REUSE
    assert plan.reuse is good
    assert plan.delete == (stale,)


def test_plan_hint_used_when_free_and_compatible() -> None:
    existing = [lease("10.244.1.0/24"), lease("10.244.2.0/24")]
    plan = plan_acquire(cfg(), existing, ME, IPv4Network("10.244.72.0/24"), random.Random(0))
    assert plan.action is AcquireAction.CREATE
    assert plan.subnet == IPv4Network("10.244.72.0/24")
    assert plan.from_hint
    assert plan.delete == ()


@pytest.mark.parametrize(
    "hint",
    [
        "10.244.1.0/24",  # taken by another node
        "10.244.0.0/24",  # below SubnetMin
        "10.244.72.0/25",  # wrong length
        "10.245.72.0/24",  # outside Network
    ],
)
def test_plan_hint_ignored_when_taken_or_incompatible(hint: str) -> None:
    c = cfg("10.244.0.0/16")
    existing = [lease("10.244.1.0/24")]
    plan = plan_acquire(c, existing, ME, IPv4Network(hint), random.Random(0))
    assert plan.action is AcquireAction.CREATE
    assert not plan.from_hint
    assert plan.subnet is not None and plan.subnet != IPv4Network("10.244.1.0/24")
    assert plan.free_candidates == FREE_WINDOW


def test_plan_hint_blocked_by_overlapping_foreign_lease() -> None:
    existing = [lease("10.244.72.0/23")]
    plan = plan_acquire(cfg(), existing, ME, IPv4Network("10.244.72.0/24"), random.Random(0))
    assert not plan.from_hint


def test_plan_random_is_seeded_and_free() -> None:
    existing = [lease(f"10.244.{i}.0/24") for i in range(1, 40)]
    taken = {x.subnet for x in existing}
    p1 = plan_acquire(cfg(), existing, ME, None, random.Random(11))
    p2 = plan_acquire(cfg(), existing, ME, None, random.Random(11))
    assert p1 == p2
    assert p1.action is AcquireAction.CREATE
    assert p1.subnet not in taken
    assert p1.free_candidates == FREE_WINDOW  # 216 free, only the first 100 count
    assert p1.subnet is not None
    assert IPv4Network("10.244.40.0/24") <= p1.subnet <= IPv4Network("10.244.139.0/24")
    assert "at random among 100" in p1.reason


def test_plan_exhausted() -> None:
    c = cfg("10.0.0.0/24")
    existing = [lease(f"10.0.0.{i}/26") for i in (64, 128, 192)]
    plan = plan_acquire(c, existing, ME, None, random.Random(0))
    assert plan.action is AcquireAction.EXHAUSTED
    assert plan.subnet is None
    assert plan.error == "no free subnet in 10.0.0.64..10.0.0.192 (3 leases)"


def test_plan_exhausted_but_our_stale_lease_frees_room() -> None:
    c = cfg("10.0.0.0/24")
    stale = lease("10.0.0.64/27", ip=str(ME))
    existing = [stale, lease("10.0.0.128/26"), lease("10.0.0.192/26")]
    plan = plan_acquire(c, existing, ME, None, random.Random(0))
    assert plan.action is AcquireAction.CREATE
    assert plan.delete == (stale,)
    assert plan.subnet == IPv4Network("10.0.0.64/26")


def test_plan_dual_stack() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    ours_v4_only = lease("10.244.5.0/24", ip=str(ME))  # no IPv6 part: incompatible
    other = lease("10.244.1.0/24", v6="fc00:0:0:1::/64")
    plan = plan_acquire(
        c,
        [ours_v4_only, other],
        ME,
        IPv4Network("10.244.5.0/24"),
        random.Random(2),
        env_hint_v6=IPv6Network("fc00:0:0:5::/64"),
    )
    assert plan.action is AcquireAction.CREATE
    assert plan.delete == (ours_v4_only,)
    assert plan.from_hint
    assert (plan.subnet, plan.subnet_v6) == (
        IPv4Network("10.244.5.0/24"),
        IPv6Network("fc00:0:0:5::/64"),
    )

    plan = plan_acquire(c, [other], ME, None, random.Random(2))
    assert plan.action is AcquireAction.CREATE
    assert plan.subnet_v6 is not None and plan.subnet_v6.prefixlen == 64
    assert plan.subnet_v6 != IPv6Network("fc00:0:0:1::/64")

    ours = lease("10.244.5.0/24", ip=str(ME), v6="fc00:0:0:5::/64")
    plan = plan_acquire(c, [ours], ME, None, random.Random(2))
    assert plan.action is AcquireAction.REUSE and plan.reuse is ours


def test_plan_v4_only_hint_ignored_when_dual_stack_needs_v6_hint() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    plan = plan_acquire(c, [], ME, IPv4Network("10.244.5.0/24"), random.Random(2))
    assert not plan.from_hint
    assert plan.subnet_v6 is not None


# ------------------------------------------------------------------ properties


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_property_choice_is_free_compatible_and_first_window(
    seed: int, taken_seed: int, n_taken: int
) -> None:
    c = cfg("10.0.0.0/22", SubnetLen=26)  # 15 candidates
    candidates = list(all_subnets(c))
    pick_taken = random.Random(taken_seed)
    taken = {
        IPv4Network(
            (int(pick_taken.choice(candidates).network_address), pick_taken.choice([24, 26, 28])),
            strict=False,
        )
        for _ in range(n_taken % 8)
    }
    free = [s for s in candidates if not any(s.overlaps(t) for t in taken)]
    got = choose_subnet(c, taken, random.Random(seed))
    if not free:
        assert got is None
    else:
        assert got in free[:FREE_WINDOW]
        assert is_compatible(c, got)
