"""The journal: round trip, durability points, torn tails, atomic compaction."""

import json
import os
import stat

import pytest

import netconf._journal as jmod
from netconf import Journal


def rec(step="route4", phase="activate", nic="52:54:00:00:00:01", **kw):
    return {"kind": "step", "step": step, "phase": phase, "nic_id": nic, "op": "x", "args": {}, "prior": {}, **kw}


def test_round_trip_and_modes(tmp_path):
    path = tmp_path / "state" / "vm1.journal"
    j = Journal(path)
    a, b = j.add([rec("sysctl-ipv4", prior={"old": {"k": "0"}}), rec("route4")])
    j.set(a, "done", result={"owned": True})
    j.set(b, "undone")
    j.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    j2 = Journal(path)
    assert [e["step"] for e in j2.live()] == ["sysctl-ipv4"]
    e = j2.live()[0]
    assert e["status"] == "done" and e["result"] == {"owned": True} and e["prior"] == {"old": {"k": "0"}}
    # ids keep increasing across reopen
    (c,) = j2.add([rec("rule4")])
    assert c["id"] == 3


def test_live_filters(tmp_path):
    j = Journal(tmp_path / "j")
    j.add([rec("tap-up", "attach"), rec("route4"), rec("route4", nic="52:54:00:00:00:02")])
    assert [e["step"] for e in j.live(phases={"attach"})] == ["tap-up"]
    assert len(j.live(nic_id="52:54:00:00:00:02")) == 1
    assert len(j.live(phases=["activate"], nic_id="52:54:00:00:00:01")) == 1


def test_add_is_one_write_and_one_fsync_status_is_not_fsynced(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_write = os.fdatasync, os.write
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "write", lambda fd, d: (calls.append("write"), real_write(fd, d))[1])
    j = Journal(tmp_path / "j")
    calls.clear()
    entries = j.add([rec(), rec(), rec()])
    assert calls == ["write", "fsync"]
    calls.clear()
    j.set(entries[0], "done")
    assert calls == ["write"]
    calls.clear()
    j.set(entries[1], "pending", sync=True, prior={"replaced": None})
    assert calls == ["write", "fsync"]


def test_record_is_on_disk_before_add_returns(tmp_path):
    path = tmp_path / "j"
    j = Journal(path)
    j.add([rec("gw6", args={"address": "fe80::1"})])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[-1]["t"] == "add" and lines[-1]["status"] == "pending" and lines[-1]["step"] == "gw6"


def test_torn_tail_is_ignored(tmp_path):
    path = tmp_path / "j"
    j = Journal(path)
    (a,) = j.add([rec()])
    j.close()
    with open(path, "a") as fh:
        fh.write('{"t":"set","id":1,"sta')  # crash in the middle of a write
    j2 = Journal(path)
    assert j2.live()[0]["status"] == "pending"


def test_compaction_keeps_only_live_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "j"
    j = Journal(path)
    a, b, c = j.add([rec("a"), rec("b"), rec("c")])
    j.set(a, "undone")
    j.set(b, "done", result={"owned": True})
    # a crash during compaction before rename leaves the old file intact
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        j.compact()
    monkeypatch.setattr(os, "rename", real_rename)
    assert [e["step"] for e in Journal(path).live()] == ["b", "c"]
    assert len(path.read_text().splitlines()) == 5
    j.compact()
    assert len(path.read_text().splitlines()) == 2
    j3 = Journal(path)
    assert [(e["step"], e["status"]) for e in j3.live()] == [("b", "done"), ("c", "pending")]
    assert j3.live()[0]["result"] == {"owned": True}
    # appends after compaction go to the new file
    j.set(c, "undone")
    assert [e["step"] for e in Journal(path).live()] == ["b"]


def test_auto_compaction_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(jmod, "COMPACT_AFTER", 4)
    j = Journal(tmp_path / "j")
    es = j.add([rec(str(i)) for i in range(5)])
    for e in es[:3]:
        j.set(e, "undone")
    assert not j.maybe_compact()
    j.set(es[3], "void")
    assert j.maybe_compact()
    assert len((tmp_path / "j").read_text().splitlines()) == 1
