"""A node (or two) with a fake QEMU, in-process, no root: the instance core's test bench.

QEMU is :mod:`fake_qemu` (real QMP on real unix sockets, a real TCP
migration stream between two fakes); everything of qsup is its real code,
including the HTTP API a migration source talks to.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from supervisor._config import load_config
from supervisor._eventlog import EventLog
from supervisor._faults import NO_FAULTS
from supervisor._node import Node
from supervisor._spec import parse_spec
from supervisor.api import create_app

FAKE = Path(__file__).with_name("fake_qemu.py")


def fake_qemu_exe(tmp_path: Path) -> Path:
    exe = tmp_path / "fake-qemu"
    if not exe.exists():
        knobs = str(tmp_path / "fake-qemu.json")
        exe.write_text(f"#!{sys.executable}\nimport os, runpy, sys\nsys.argv[0] = {str(FAKE)!r}\n"
                       f"os.environ['FAKE_QEMU_KNOBS'] = {knobs!r}\n"
                       f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
        exe.chmod(0o755)
    return exe


def spec(tmp_path: Path, name: str = "vm", **kw):
    kernel = tmp_path / "vmlinuz"
    if not kernel.exists():
        kernel.write_bytes(b"not really a kernel")
    return parse_spec({"name": name, "memory": 64, "kernel": str(kernel), **kw})


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def fakes_alive(tmp_path: Path) -> list[int]:
    """Fake QEMUs started under ``tmp_path`` that still run (found by their socket paths)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(str(tmp_path).encode() in a for a in argv) and any(b"fake" in a for a in argv[:2]) \
                and pid_alive(int(d)):
            out.append(int(d))
    return out


class Bench:
    """One node: config, event log, Node, and (optionally) its API on a unix socket."""

    def __init__(self, tmp_path: Path, name: str = "a", faults=NO_FAULTS, **cfg):
        self.tmp = tmp_path
        self.dir = tmp_path / name
        self.dir.mkdir(exist_ok=True)
        self.socket = self.dir / "qsup.sock"
        base = dict(state_dir=str(self.dir / "state"), run_dir=str(self.dir / "run"), socket=str(self.socket),
                    hooks_dir="", accel="tcg", qemu=str(fake_qemu_exe(tmp_path)), qemu_user="",
                    powerdown_timeout=2.0, node_name=name, migration_address="127.0.0.1",
                    image_dirs=[str(tmp_path)])  # where spec() writes its kernel
        base.update(cfg)
        self.cfg = load_config(None, **base)
        self.faults = faults
        self.events = EventLog(None)
        self.node: Node | None = None

    def types(self, name: str | None = None) -> list[str]:
        return [e["type"] for e in self.events.since(0, 100000) if name is None or e.get("instance") == name]

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.events.since(0, 100000) if e["type"] == type_]

    @asynccontextmanager
    async def running(self, *, api: bool = False):
        self.node = Node(self.cfg, self.events, faults=self.faults)
        async with self.node.running():
            self.reattached = await self.node.reattach()  # what the daemon does first
            async with trio.open_nursery() as n:
                if api:
                    hc = HyperConfig()
                    hc.bind = [f"unix:{self.socket}"]
                    hc.loglevel = "WARNING"
                    app = create_app(self.node, self.events)
                    await n.start(functools.partial(serve, app, hc, shutdown_trigger=trio.sleep_forever))
                try:
                    yield self
                finally:
                    n.cancel_scope.cancel()

    def state_left(self) -> list[str]:
        d = self.dir / "state" / "instances"
        return sorted(os.listdir(d)) if d.exists() else []


def fake_knobs(tmp_path: Path, **knobs) -> None:
    """How the next fake QEMUs under ``tmp_path`` behave (see fake_qemu's docstring)."""
    (tmp_path / "fake-qemu.json").write_text(json.dumps(knobs))


async def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(interval)
