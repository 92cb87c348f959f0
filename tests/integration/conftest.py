"""A real etcd server on 127.0.0.1 (Debian's /usr/bin/etcd), one per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from control.lab.etcd import ETCD_BIN, EtcdServer


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A fresh single-member etcd on free 127.0.0.1 ports; removed afterwards."""
    if not os.access(ETCD_BIN, os.X_OK):
        pytest.skip(f"{ETCD_BIN} is missing (apt-get install etcd-server etcd-client)")
    with EtcdServer() as server:
        yield server
