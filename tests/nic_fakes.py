"""A fake host network for NIC tests without root: taps are files, netconf's ops write a JSON file.

* :func:`open_tap` opens ``$NIC_FAKE_DIR/taps/NAME`` once per queue: the "tap" exists while some
  process (qsup, the fake QEMU) holds a descriptor of it, as a non-persistent tap does
  (:func:`taps_held` looks in ``/proc/*/fd``);
* every netconf op (link, bridge_port, route, ...) records its effect in ``$NIC_FAKE_DIR/host.json``
  keyed by op and args, and undo deletes it: what the host holds is that file (:func:`host`);
* ``check_link`` refuses a bridge named ``nobr`` (a missing bridge), as the real one would.

The real executor, journal and hooks run on top.  A file, not memory, so a daemon killed in a
child process (tests/test_nic_hotplug.py's kill -9 cases) leaves its host state for the next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import netconf
import netconf._ops as ops

OP_NAMES = ("link", "bridge_port", "bridge_vlan", "ovs_port", "sysctl", "addr", "neigh", "route", "rule")


def _dir() -> Path:
    return Path(os.environ["NIC_FAKE_DIR"])


def host() -> dict:
    p = _dir() / "host.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _save(h: dict) -> None:
    p = _dir() / "host.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(h, sort_keys=True))
    os.rename(tmp, p)


def _key(op: str, args: dict) -> str:
    return f"{op} {json.dumps(args, sort_keys=True)}"


class FakeOp(ops.Op):
    name = "?"

    def observe(self, args):
        return {}

    def apply(self, args, prior, note):
        fail, _, only = os.environ.get("NIC_FAKE_FAIL", "").partition(":")  # "route" or "route:10.9.0.7"
        if fail == self.name and only in json.dumps(args):
            raise OSError(5, f"fake host refuses {self.name}")
        h = host()
        h[_key(self.name, args)] = True
        _save(h)

    def undo(self, args, prior, result):
        h = host()
        h.pop(_key(self.name, args), None)
        _save(h)


def open_tap(name: str, queues: int = 1, mac: str | None = None) -> netconf.TapHandle:
    d = _dir() / "taps"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    if path in taps_held():
        raise OSError(16, f"tap {name} exists (EBUSY)")
    fds = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for _ in range(queues)]
    return netconf.TapHandle(name=name, fds=fds, vnet_hdr=True)


def taps_held() -> set[Path]:
    """The fake taps some process holds a descriptor of (a tap that exists)."""
    d = str(_dir() / "taps")
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(d + "/"):
                    out.add(Path(target))
        except OSError:
            continue
    return out


def tap_names() -> set[str]:
    return {p.name for p in taps_held()}


def check_link(nic, index=None, *, ovs_db=None) -> None:
    if nic.link == "nobr":
        field = f"nics[{index}]." if index is not None else ""
        raise netconf.NetconfError(f"{field}link: bridge 'nobr' does not exist")


def install(monkeypatch=None) -> None:
    """Patch netconf (in this process): taps, ops, host checks."""
    ops_cls = {n: type(f"Fake_{n}", (FakeOp,), {"name": n}) for n in OP_NAMES}
    if monkeypatch is None:
        ops.OPS.update(ops_cls)
        netconf.open_tap = open_tap  # type: ignore[attr-defined]
        netconf.check_link = check_link  # type: ignore[attr-defined]
        return
    for n, c in ops_cls.items():
        monkeypatch.setitem(ops.OPS, n, c)
    monkeypatch.setattr(netconf, "open_tap", open_tap, raising=False)
    monkeypatch.setattr(netconf, "check_link", check_link, raising=False)
