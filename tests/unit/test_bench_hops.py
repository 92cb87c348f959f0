"""bench.hops: pairing tcpdump timestamps into send and receive hops."""

from __future__ import annotations

from pathlib import Path

from bench.hops import _timestamps, pair_hops, syscall_report, syscall_stretches

DEVICE = """\
100.000100000 IP 10.244.1.2 > 10.244.2.2: ICMP echo request, id 1, seq 1, length 64
100.000400000 IP 10.244.2.2 > 10.244.1.2: ICMP echo reply, id 1, seq 1, length 64
"""
WIRE = """\
100.000250000 IP 192.168.77.10.8472 > 192.168.77.11.8472: VXLAN, flags [I] (0x08), vni 1
IP 10.244.1.2 > 10.244.2.2: ICMP echo request, id 1, seq 1, length 64
100.000300000 IP 192.168.77.11.8472 > 192.168.77.10.8472: VXLAN, flags [I] (0x08), vni 1
IP 10.244.2.2 > 10.244.1.2: ICMP echo reply, id 1, seq 1, length 64
"""


def test_hops_from_tcpdump_listings(tmp_path: Path) -> None:
    (tmp_path / "dev.txt").write_text(DEVICE)
    (tmp_path / "wire.txt").write_text(WIRE)
    wire = _timestamps(tmp_path / "wire.txt")
    assert len(wire) == 2 and "echo request" in wire[0][1]  # continuation lines joined
    send, receive = pair_hops(_timestamps(tmp_path / "dev.txt"), wire)
    assert [round(x) for x in send] == [150]
    assert [round(x) for x in receive] == [100]


# `perf script` over raw_syscalls of n1's weft for one echo request and its reply
# (session 20; the argument lists shortened): epoll returns, readv, sendto, epoll
# sleeps; the reply: epoll returns, recvmsg, writev to the TUN, epoll again.
PERF_SCRIPT = """\
          python 28545 [001]  2424.013047:  raw_syscalls:sys_exit: NR 281 = 1
          python 28545 [001]  2424.013117: raw_syscalls:sys_enter: NR 19 (a, 7f, 2, 0, 0, 0)
          python 28545 [001]  2424.013127:  raw_syscalls:sys_exit: NR 19 = 94
          python 28545 [001]  2424.013178: raw_syscalls:sys_enter: NR 44 (1d, 7f, 62, 0)
          python 28545 [001]  2424.013222:  raw_syscalls:sys_exit: NR 44 = 98
          python 28545 [001]  2424.013234: raw_syscalls:sys_enter: NR 281 (6, 7f, 400, ffffffff)
          python 28545 [001]  2424.013485:  raw_syscalls:sys_exit: NR 281 = 1
          python 28545 [001]  2424.013524: raw_syscalls:sys_enter: NR 47 (11, 7f, 40)
          python 28545 [001]  2424.013529:  raw_syscalls:sys_exit: NR 47 = 98
          python 28545 [001]  2424.013596: raw_syscalls:sys_enter: NR 20 (10, 7f, 2)
          python 28545 [001]  2424.013632:  raw_syscalls:sys_exit: NR 20 = 94
          python 28545 [001]  2424.013644: raw_syscalls:sys_enter: NR 281 (6, 7f, 400, ffffffff)
"""


def test_syscall_stretches_split_a_hop_into_user_and_kernel_time() -> None:
    between, inside = syscall_stretches(PERF_SCRIPT)
    got = {k: [round(x) for x in v] for k, v in between.items()}
    assert got == {
        ("epoll_pwait", "readv"): [70],  # the wake-up: event loop and drain set-up
        ("readv", "sendto"): [51],  # the packet's Python
        ("sendto", "epoll_pwait"): [12],
        ("epoll_pwait", "recvmsg"): [39],
        ("recvmsg", "writev"): [67],
        ("writev", "epoll_pwait"): [12],
    }
    assert {k: [round(x) for x in v] for k, v in inside.items()} == {
        "readv": [10], "sendto": [44], "epoll_pwait": [251], "recvmsg": [5], "writev": [36],
    }  # fmt: skip
    report = "\n".join(syscall_report(PERF_SCRIPT, least=1))
    assert "readv → sendto: p50 51 µs, min 51 µs (1 times)" in report
    assert "epoll_pwait:" not in report.split("inside them")[1]  # waiting, not work
    assert syscall_stretches("not perf output\n") == ({}, {})


def test_syscalls_of_a_node_without_weft_is_a_one_line_error(capsys) -> None:  # type: ignore[no-untyped-def]
    from bench import hops

    assert hops.main(["--mode", "kernel-vxlan", "--syscalls"]) == 2
    assert capsys.readouterr().err == "bench.hops: --syscalls: n1 runs no weft\n"
