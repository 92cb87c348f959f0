"""The deployment files in docs/deploy parse, and run command lines `weft agent` accepts."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import yaml

from control.cli import _register_all, build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"


def agent_accepts(argv: list[str]) -> None:
    _register_all()
    args = build_parser().parse_args(argv)  # SystemExit(2) on a flag it does not know
    assert args.command == "agent"


def test_systemd_unit_runs_a_valid_agent_command() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "weft.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/weft")
    agent_accepts(argv[1:])
    assert unit["Service"]["KillSignal"] == "SIGTERM"


def test_daemonset_runs_a_valid_agent_command_with_what_it_needs() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "weft-daemonset.yml").read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["weft"]
    agent_accepts(container["args"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/run/flannel", "/dev/net/tun", "/var/lib/weft"} <= mounts
    assert any(e["name"].startswith("FLANNELD_") for e in container["env"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    conf = json.loads(cm["data"]["cni-conf.json"])
    assert conf["plugins"][0]["type"] == "flannel"


def test_cni_conflist_delegates_through_the_flannel_plugin() -> None:
    conf = json.loads((DEPLOY / "10-weft.conflist").read_text())
    flannel = conf["plugins"][0]
    assert flannel["type"] == "flannel" and flannel["subnetFile"] == "/run/flannel/subnet.env"
