"""bench/parse.py: ping, iperf3 -J, /proc and rr.py output."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.parse import (
    ParseError,
    cpuinfo_model,
    echo_turnarounds,
    parse_iperf3_tcp,
    parse_iperf3_udp,
    parse_rr,
    pid_stat_times,
    pid_status_rss_kb,
    ping_counts,
    ping_rtts,
    ping_stats,
    proc_net_snmp,
    proc_stat_cpu,
)

PING = """PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.
64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.512 ms
64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=0.101 ms
64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=0.900 ms (DUP!)
64 bytes from 10.244.2.2: icmp_seq=4 ttl=62 time=0.300 ms

--- 10.244.2.2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 0.101/0.304/0.512/0.166 ms
"""


def test_ping_per_reply_times_without_duplicates() -> None:
    assert ping_rtts(PING) == [0.512, 0.101, 0.300]
    assert ping_counts(PING) == (4, 3)
    st_ = ping_stats(PING)
    assert st_["sent"] == 4 and st_["received"] == 3 and st_["loss_pct"] == 25.0
    assert st_["p50_ms"] == 0.300
    assert st_["min_ms"] == 0.101 and st_["max_ms"] == 0.512
    assert st_["p99_ms"] == pytest.approx(0.512 - 0.02 * (0.512 - 0.300))
    assert st_["p999_ms"] == pytest.approx(0.512 - 0.002 * (0.512 - 0.300))


def test_ping_with_no_replies() -> None:
    text = (
        "PING x\n\n--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss\n"
    )
    st_ = ping_stats(text)
    assert st_["received"] == 0 and st_["loss_pct"] == 100.0 and st_["p50_ms"] is None


def test_ping_sub_millisecond_marker() -> None:
    assert ping_rtts("64 bytes from 1.2.3.4: icmp_seq=7 ttl=64 time<0.001 ms") == [0.001]


def _tcp_json() -> str:
    return json.dumps(
        {
            "start": {},
            "end": {
                "sum_sent": {
                    "bytes": 1_000_000,
                    "bits_per_second": 8e6,
                    "retransmits": 3,
                    "seconds": 1.0,
                },
                "sum_received": {"bytes": 999_000, "bits_per_second": 7.99e6, "seconds": 1.0},
            },
        }
    )


def test_iperf3_tcp_receiver_side() -> None:
    r = parse_iperf3_tcp(_tcp_json())
    assert r.bytes == 999_000 and r.bits_per_second == 7.99e6 and r.retransmits == 3


def test_iperf3_udp_counts_received_as_sent_minus_lost() -> None:
    text = json.dumps(
        {
            "end": {
                "sum_received": {
                    "packets": 1000,
                    "lost_packets": 250,
                    "seconds": 2.0,
                    "bytes": 48000,
                }
            }
        }
    )
    r = parse_iperf3_udp(text, 64)
    assert (r.sent_packets, r.lost_packets, r.received_packets) == (1000, 250, 750)
    assert r.received_pps == 375.0 and r.loss_pct == 25.0 and r.payload_bytes == 750 * 64
    # iperf3 before 3.11 put the server's counts in end.sum
    old = json.dumps({"end": {"sum": {"packets": 10, "lost_packets": 0, "seconds": 1.0}}})
    assert parse_iperf3_udp(old, 64).received_pps == 10.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"error": "unable to connect to server"}',
        '{"start": {}}',
        '{"end": {}}',
    ],
)
def test_iperf3_errors_are_parse_errors(text: str) -> None:
    with pytest.raises(ParseError):
        parse_iperf3_tcp(text)
    with pytest.raises(ParseError):
        parse_iperf3_udp(text, 64)


def test_proc_stat_cpu() -> None:
    text = "cpu  100 5 50 1000 10 1 2 3 0 0\ncpu0 50 2 25 500 5 1 1 1 0 0\nintr 1\n"
    busy, total = proc_stat_cpu(text)
    assert busy == 100 + 5 + 50 + 1 + 2 + 3
    assert total == busy + 1000 + 10
    with pytest.raises(ParseError):
        proc_stat_cpu("intr 1\n")


def test_pid_stat_with_a_nasty_command_name() -> None:
    fields = ["S"] + [str(i) for i in range(4, 14)] + ["700", "300"] + ["0"] * 30
    text = "4242 (we ft) (x)) " + " ".join(fields)
    assert sum(pid_stat_times(text)) == 1000
    fields[13:15] = ["20", "22"]  # cutime, cstime: children waited for
    text = "4242 (we ft) (x)) " + " ".join(fields)
    assert sum(pid_stat_times(text)) == 1000
    assert sum(pid_stat_times(text, reaped=True)) == 1042
    assert pid_stat_times(text) == (700, 300)  # user, system
    assert pid_stat_times(text, reaped=True) == (720, 322)
    with pytest.raises(ParseError):
        pid_stat_times("4242 (x) S 1 2")
    with pytest.raises(ParseError):
        pid_stat_times("garbage")


@given(
    st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=16),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_pid_stat_any_comm(comm: str, utime: int, stime: int) -> None:
    fields = ["R"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 20
    assert pid_stat_times(f"1 ({comm}) " + " ".join(fields)) == (utime, stime)


def test_status_rss_and_cpuinfo() -> None:
    assert pid_status_rss_kb("Name:\tx\nVmRSS:\t  12345 kB\n") == 12345
    assert pid_status_rss_kb("Name:\tx\n") is None
    assert cpuinfo_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"
    assert cpuinfo_model("") == "unknown"


def test_rr_output() -> None:
    assert parse_rr('noise\n{"transactions": 500, "seconds": 0.5}\n') == {
        "transactions": 500,
        "seconds": 0.5,
        "per_second": 1000.0,
    }
    udp = '{"transactions": 4000, "seconds": 2.0, "p50_ms": 0.41, "p99_ms": 1.2, "lost": 3}'
    assert parse_rr(udp) == {
        "transactions": 4000,
        "seconds": 2.0,
        "per_second": 2000.0,
        "p50_ms": 0.41,
        "p99_ms": 1.2,
        "lost": 3.0,
    }
    with pytest.raises(ParseError):
        parse_rr("Traceback: ConnectionRefusedError")


def test_rr_result_takes_nearest_rank_percentiles() -> None:
    from bench.rr import result

    rtts = [i / 1e3 for i in range(100, 0, -1)]  # 100 round trips, 1..100 ms, unsorted
    out = result(rtts, 2.0)
    assert out["transactions"] == 100 and out["seconds"] == 2.0
    assert out["p50_ms"] == pytest.approx(51.0) and out["p99_ms"] == pytest.approx(100.0)
    assert "p50_ms" not in result([], 1.0)


def test_pyspy_raw_leaf_shares() -> None:
    from bench.profile import leaf_shares

    raw = (
        "<module> (weft.py:1);run (asyncio/runners.py:118) 50\n"
        "<module> (weft.py:1);_on_device (dataplane/io/runner.py:80);readv (x/os.py:3) 30\n"
        "<module> (weft.py:1);_on_device (dataplane/io/runner.py:90);readv (x/os.py:4) 10\n"
        "garbage line\n"
        "<module> (weft.py:1);encap (backends/vxlan.py:50) 10\n"
    )
    total, top = leaf_shares(raw)
    assert total == 100
    assert top[0] == ("run (asyncio/runners.py)", 0.5)
    assert top[1] == ("readv (x/os.py)", 0.4)  # two lines of one function, merged
    assert leaf_shares("") == (0, [])


SNMP = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors
Ip: 2 64 6749 0
IcmpMsg: InType3
IcmpMsg: 1
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
Udp: 304846 0 241163 1 241163 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors
UdpLite: 0 0 0 0 0
"""


def test_proc_net_snmp_pairs_names_with_values() -> None:
    """A receiving pod's /proc/net/snmp after a 64-byte flood (session 20): the
    datagrams its socket dropped with a full buffer are Udp.RcvbufErrors."""
    got = proc_net_snmp(SNMP)
    assert got["Udp.RcvbufErrors"] == 241163 and got["Udp.InDatagrams"] == 304846
    assert got["UdpLite.RcvbufErrors"] == 0 and got["Ip.InReceives"] == 6749
    assert got["IcmpMsg.InType3"] == 1
    # A torn read (names without their values, a line of another protocol) is skipped.
    assert proc_net_snmp("Udp: InDatagrams RcvbufErrors\nTcp: 1 2\n") == {}
    assert proc_net_snmp("") == {}


def test_echo_turnarounds_pair_requests_with_their_replies() -> None:
    """tcpdump -T vxlan at n2: the outer header on one line, the inner packet on the
    next; a request's time to its reply's, matched by id and seq (another ping's
    reply, a reply without a request, a lost reply and TCP are left out)."""
    outer = "IP 192.168.77.10.40000 > 192.168.77.11.8472: VXLAN, flags [I] (0x08), vni 1"
    back = "IP 192.168.77.11.51000 > 192.168.77.10.8472: VXLAN, flags [I] (0x08), vni 1"
    inner = "IP 10.244.{} > 10.244.{}: ICMP echo {}, id {}, seq {}, length 64"
    text = "\n".join([
        f"100.000100000 {outer}", "    " + inner.format("1.2", "2.2", "request", 7, 1),
        f"100.000350000 {back}", "    " + inner.format("2.2", "1.2", "reply", 7, 1),
        f"100.001000000 {outer}", "    " + inner.format("1.2", "2.2", "request", 7, 2),
        f"100.001500000 {back}", "    " + inner.format("2.2", "1.2", "reply", 8, 2),
        f"100.002000000 {back}", "    " + inner.format("2.2", "1.2", "reply", 7, 3),
        f"100.003000000 {outer} " + inner.format("1.2", "2.2", "request", 7, 4),
        f"100.003002000 {outer} IP 10.244.1.2.5 > 10.244.2.2.6: Flags [.], ack 1, length 0",
        f"100.003120000 {back} " + inner.format("2.2", "1.2", "reply", 7, 4),
    ])  # fmt: skip
    got = echo_turnarounds(text)
    assert got == [pytest.approx(250.0), pytest.approx(120.0)]
