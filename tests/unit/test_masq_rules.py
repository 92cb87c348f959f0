from ipaddress import IPv4Network

from control.masq import masq_rules


def test_flannel_masquerade_rules_in_order() -> None:
    rules = masq_rules(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"), True)
    text = [" ".join(r) for r in rules]
    c = "-m comment --comment flanneld masq"
    assert text == [
        f"-m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-s 10.244.1.0/24 -d 10.244.0.0/16 {c} -j RETURN",
        f"-s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"! -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"-s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully",
    ]
    plain = masq_rules(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"), False)
    assert all("--random-fully" not in r for r in plain)
