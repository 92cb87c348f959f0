"""`--ip-masq`: flannel's masquerade rules (pkg/trafficmngr/iptables), via iptables.

The rule set is pure data (`masq_rules`); `apply_masq` installs it
idempotently in the nat table: a chain FLANNEL-POSTRTG jumped to from
POSTROUTING, every rule commented "flanneld masq" as flannel's are, so either
agent recognises the other's rules. Pod traffic leaving the cluster network
is masqueraded; pod-to-pod traffic is not.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from ipaddress import IPv4Network

log = logging.getLogger("weft.masq")

CHAIN = "FLANNEL-POSTRTG"
COMMENT = ["-m", "comment", "--comment", "flanneld masq"]
KUBE_PROXY_MARK = "0x4000/0x4000"


def masq_rules(network: IPv4Network, subnet: IPv4Network, random_fully: bool) -> list[list[str]]:
    """The rules of FLANNEL-POSTRTG, in order (facts §4)."""
    net, pod = str(network), str(subnet)
    masq = ["-j", "MASQUERADE", *(["--random-fully"] if random_fully else [])]
    return [
        ["-m", "mark", "--mark", KUBE_PROXY_MARK, *COMMENT, "-j", "RETURN"],
        ["-s", pod, "-d", net, *COMMENT, "-j", "RETURN"],
        ["-s", net, "-d", pod, *COMMENT, "-j", "RETURN"],
        ["!", "-s", net, "-d", pod, *COMMENT, "-j", "RETURN"],
        ["-s", net, "!", "-d", "224.0.0.0/4", *COMMENT, *masq],
        ["!", "-s", net, "-d", net, *COMMENT, *masq],
    ]


class MasqError(RuntimeError):
    pass


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("iptables")
    if binary is None:
        raise MasqError("--ip-masq needs iptables (apt-get install iptables)")
    cp = subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise MasqError(f"iptables {' '.join(args)}: {cp.stderr.strip()}")
    return cp


def _supports_random_fully() -> bool:
    out = _iptables("-j", "MASQUERADE", "--help", check=False).stdout
    return "random-fully" in out


def apply_masq(network: IPv4Network, subnet: IPv4Network) -> None:
    """Install (or repair) the chain; rules already present are left alone."""
    if _iptables("-t", "nat", "-S", CHAIN, check=False).returncode != 0:
        _iptables("-t", "nat", "-N", CHAIN)
    rules = masq_rules(network, subnet, _supports_random_fully())
    # Rebuild the chain when its contents differ (e.g. a new subnet after re-acquire).
    if _chain_rules() != [_normalise(r) for r in rules]:
        _iptables("-t", "nat", "-F", CHAIN)
        for rule in rules:
            _iptables("-t", "nat", "-A", CHAIN, *rule)
    jump = ["POSTROUTING", *COMMENT, "-j", CHAIN]
    if _iptables("-t", "nat", "-C", *jump, check=False).returncode != 0:
        _iptables("-t", "nat", "-I", *jump)
    log.info("ip-masq: %s masqueraded when leaving %s", subnet, network)


def _normalise(rule: list[str]) -> str:
    return " ".join(rule).replace('"', "")


def _chain_rules() -> list[str]:
    out = _iptables("-t", "nat", "-S", CHAIN).stdout.splitlines()
    prefix = f"-A {CHAIN} "
    return [line[len(prefix) :].replace('"', "") for line in out if line.startswith(prefix)]
