"""--ip-masq: flannel's rules installed in a node namespace, and what they do to traffic."""

from __future__ import annotations

from ipaddress import IPv4Network

from control.lab.netns import in_netns
from control.lab.topology import Lab
from control.masq import apply_masq

NETWORK = IPv4Network("10.244.0.0/16")


def test_masq_rules_installed_idempotently_and_pods_reach_outside(lab: Lab) -> None:
    lab.add_underlay()
    n1, n2 = lab.add_node("n1"), lab.add_node("n2")
    lab.add_cni(n1, "10.244.1.0/24")
    pod = lab.add_pod(n1)
    # n2 has no route back to pods: without masquerading, the reply is lost.
    assert not lab.ping(pod, n2.underlay_ip, count=1, timeout_s=2)
    with in_netns(n1.ns):
        apply_masq(NETWORK, IPv4Network("10.244.1.0/24"))
        apply_masq(NETWORK, IPv4Network("10.244.1.0/24"))
    rules = lab.run(n1, "iptables", "-t", "nat", "-S").stdout.splitlines()
    assert sum("-j FLANNEL-POSTRTG" in r for r in rules) == 1
    chain = [r for r in rules if r.startswith("-A FLANNEL-POSTRTG")]
    assert len(chain) == 6 and all("flanneld masq" in r for r in chain)
    assert lab.ping(pod, n2.underlay_ip, count=2)
    # A new subnet (re-acquired lease) rewrites the chain instead of adding to it.
    with in_netns(n1.ns):
        apply_masq(NETWORK, IPv4Network("10.244.7.0/24"))
    chain = [r for r in lab.run(n1, "iptables", "-t", "nat", "-S").stdout.splitlines()
             if r.startswith("-A FLANNEL-POSTRTG")]  # fmt: skip
    assert len(chain) == 6 and any("10.244.7.0/24" in r for r in chain)
