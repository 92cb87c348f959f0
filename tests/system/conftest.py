"""System tier: root, network namespaces, TUN/TAP and the kernel's VXLAN.

Every test here is marked ``system`` and the whole tier is skipped, with the
reason, when the machine cannot run it.  Traffic stays inside namespaces the
``lab`` fixture creates; the fixture always tears its lab down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.lab.netns import new_tag
from control.lab.topology import Lab

HERE = Path(__file__).parent


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root (network namespaces, TUN/TAP, vxlan)"
    for tool in ("ip", "bridge", "ping"):
        if shutil.which(tool) is None:
            return f"system tests need `{tool}` (apt-get install iproute2 iputils-ping)"
    try:
        cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` is unavailable: {e}"
    if cp.returncode != 0:
        return f"`ip netns` is unavailable: {cp.stderr.strip()}"
    return None


_SKIP_REASON = _why_unavailable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=_SKIP_REASON) if _SKIP_REASON else None
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)
            if skip is not None:
                item.add_marker(skip)


def unique_tag() -> str:
    """A lab tag (``wl`` + 4 hex) not used by any namespace or live run."""
    return new_tag()


@pytest.fixture(scope="session", autouse=True)
def _stale_labs() -> None:
    """Remove leftovers of crashed runs (their owner process is gone)."""
    if _SKIP_REASON is None:
        Lab.cleanup_stale()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An empty Lab (no underlay yet); closed even when the test fails."""
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def two_nodes(lab: Lab):
    """Underlay 192.168.77.0/24 with nodes n1 (.10) and n2 (.11)."""
    lab.add_underlay()
    return lab.add_node("n1"), lab.add_node("n2")
