"""--cpus (dataplane/io/cpus.py): the CPU list, the placement, the RPS mask sysfs takes,
and pinning every thread of a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from control.cli import CliError, cpu_placement, parse_cpus
from dataplane.io.cpus import (
    CpuListError,
    RpsSetting,
    format_cpu_list,
    parse_cpu_list,
    plan,
    rps_mask,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", (0,)),
        ("0,2", (0, 2)),
        ("0-3", (0, 1, 2, 3)),
        ("0-1,6", (0, 1, 6)),
        ("2,0", (2, 0)),  # queue 0 on CPU 2, queue 1 on CPU 0
        ("0,0-1", (0, 1)),
        (" 1 , 3 ", (1, 3)),
    ],
)
def test_cpu_lists_as_taskset_writes_them(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["a", "-1", "1-", "3-1", "0,,1", "0x1", "1.5"])
def test_a_malformed_cpu_list_is_an_error(text: str) -> None:
    with pytest.raises(CpuListError):
        parse_cpu_list(text)


def test_the_cli_takes_an_empty_list_as_the_schedulers_choice() -> None:
    assert parse_cpus("") == ()
    assert cpu_placement(()) == {"cpus": (), "steer_cpus": ()}


def test_the_kernels_work_goes_to_the_cpus_left_over() -> None:
    p = plan((0,), {0, 1, 2, 3})
    assert p.pinned == (0,) and p.steer == (1, 2, 3)
    assert [p.cpu_of(q) for q in range(3)] == [0, 0, 0]
    p = plan((2, 0), [0, 1, 2])
    assert p.steer == (1,) and [p.cpu_of(q) for q in range(4)] == [2, 0, 2, 0]
    assert plan((0, 1), [0, 1]).steer == ()  # nothing left: the writes keep their work


def test_a_cpu_this_process_may_not_use_is_a_one_line_error() -> None:
    with pytest.raises(CpuListError, match=r"CPU 7 is not available .*\(allowed: 0-3,6\)"):
        plan((0, 7), [0, 1, 2, 3, 6])
    with pytest.raises(CliError, match="CPU 4096 is not available"):
        cpu_placement((4096,))


def test_format_cpu_list_folds_runs() -> None:
    assert format_cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert format_cpu_list([3]) == "3"
    assert format_cpu_list([1, 3]) == "1,3"


@pytest.mark.parametrize(
    ("cpus", "mask"),
    [
        ((1,), "00000002"),
        ((1, 2), "00000006"),
        ((0, 31), "80000001"),
        ((32,), "00000001,00000000"),
        ((1, 33, 64), "00000001,00000002,00000002"),
        ((), "00000000"),  # RPS off
    ],
)
def test_rps_masks_in_sysfs_bitmap_form(cpus: tuple[int, ...], mask: str) -> None:
    assert rps_mask(cpus) == mask


def test_an_rps_setting_is_put_back_as_it_was(tmp_path: Path) -> None:
    queue = tmp_path / "gso-weft.1" / "queues" / "rx-1"
    queue.mkdir(parents=True)
    (queue / "rps_cpus").write_text("00000000\n")
    rps = RpsSetting("gso-weft.1", 1, root=tmp_path)
    rps.apply([1, 2])
    assert (queue / "rps_cpus").read_text() == "00000006\n"
    rps.restore()
    assert (queue / "rps_cpus").read_text() == "00000000\n"
    rps.restore()  # twice is harmless


def test_an_rps_setting_without_its_file_raises_oserror(tmp_path: Path) -> None:
    rps = RpsSetting("gone", 0, root=tmp_path)
    with pytest.raises(OSError):
        rps.apply([1])
    rps.restore()  # nothing was set: nothing to put back


def test_pin_moves_every_thread_of_the_process() -> None:
    """In a child process (the test run keeps its own CPUs): a thread started before
    pin() and one started after both end up on the one CPU."""
    script = (
        "import os, threading\n"
        "from dataplane.io.cpus import pin\n"
        "go = threading.Event()\n"
        "before = threading.Thread(target=go.wait); before.start()\n"
        "cpu = max(os.sched_getaffinity(0))\n"
        "pin(cpu)\n"
        "after = threading.Thread(target=go.wait); after.start()\n"
        "sets = [os.sched_getaffinity(t) for t in (0, before.native_id, after.native_id)]\n"
        "go.set(); before.join(); after.join()\n"
        "print(cpu, sets)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    cpu = int(out[0])
    assert out[1].strip() == str([{cpu}] * 3)
