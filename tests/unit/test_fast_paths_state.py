"""offloads.FastPaths: which fast paths are on, why the others are off, and what
`--offload on` does when the kernel refuses one (the probes themselves run against
the kernel in tests/system/test_fastpath*.py)."""

from __future__ import annotations

import argparse
import errno

import pytest

from control import cli
from dataplane.io import offloads
from dataplane.io.offloads import FastPaths, OffloadRefused


def test_auto_records_a_refusal_and_goes_on() -> None:
    paths = FastPaths("auto")
    paths.enable("tso_read")
    paths.refuse("tunnel_gso", "TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+): EINVAL")
    st = paths.status()
    assert st["on"] == ["tso_read"]
    assert st["off"] == {"tunnel_gso": "TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+): EINVAL"}


def test_on_refuses_with_the_reason_alone() -> None:
    paths = FastPaths("on")
    with pytest.raises(OffloadRefused) as info:
        paths.refuse("uso_write", "TUN without USO (Linux 6.2+): EINVAL")
    assert info.value.errno == errno.EOPNOTSUPP
    assert str(info.value) == "--offload on: uso_write: TUN without USO (Linux 6.2+): EINVAL"


def test_the_cli_prints_a_refusal_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(_args: argparse.Namespace) -> int:
        FastPaths("on").refuse("tunnel_gso", "TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+)")
        return 0

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=refused, verbose=0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 1
    assert capsys.readouterr().err == (
        "weft: error: --offload on: tunnel_gso: TAP refused TUN_F_UDP_TUNNEL_GSO (Linux 6.17+)\n"
    )


def test_disabled_paths_are_not_wanted_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(offloads.DISABLE_ENV, "udp_gro, tx_batch")
    paths = FastPaths("on")
    assert not paths.wanted("udp_gro") and not paths.wanted("tx_batch")
    assert paths.wanted("recvmmsg")
    assert set(paths.why_off) == {"udp_gro", "tx_batch"}
    assert all(offloads.DISABLE_ENV in why for why in paths.why_off.values())


def test_a_path_turned_off_while_running_keeps_its_reason() -> None:
    paths = FastPaths("auto")
    for path in ("tso_read", "udp_segment", "tx_batch"):
        paths.enable(path)
    paths.turn_off("udp_segment", "sendmsg with UDP_SEGMENT failed: EIO: Input/output error")
    assert paths.status()["on"] == ["tso_read", "tx_batch"]
    assert "EIO" in paths.why_off["udp_segment"]
    paths.enable("udp_segment")
    assert "udp_segment" not in paths.why_off
