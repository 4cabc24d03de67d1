"""Per-instance QEMU uids: the allocator skips accounts, live processes and taken uids."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from supervisor._uids import (
    UidAllocator,
    UidsExhausted,
    has_account,
    parse_uid_range,
    process_ids,
)


def alloc(r="100-104", accounts=(), procs=()):
    return UidAllocator(r, account=lambda u: u in accounts, processes=lambda: set(procs))


def test_parse_range():
    assert parse_uid_range("60000-60999") == range(60000, 61000)
    assert parse_uid_range("7-7") == range(7, 8)
    for bad in ("0-10", "10-5", "60000", "a-b", "1-4294967295", "1-2\n", " 1-2", "-1-2", ""):
        with pytest.raises(ValueError):
            parse_uid_range(bad)


def test_allocates_distinct_uids_until_exhausted():
    a = alloc()
    got = [a.allocate() for _ in range(5)]
    assert sorted(got) == [100, 101, 102, 103, 104]
    with pytest.raises(UidsExhausted, match="100-104"):
        a.allocate()


def test_skips_taken_accounts_and_processes():
    a = alloc(accounts={100}, procs={101, 0, 5})
    assert a.allocate(taken={102}) == 103
    assert a.allocate(taken={102}) == 104
    with pytest.raises(UidsExhausted):
        a.allocate(taken={102})


def test_release_makes_a_uid_reusable_but_last():
    a = alloc("100-102")
    assert [a.allocate(), a.allocate()] == [100, 101]
    a.release(100)
    assert a.allocate() == 102  # round-robin: the just-released uid is not first
    assert a.allocate() == 100
    a.release(100)
    a.release(100)  # idempotent


def test_hold_marks_reattached_uids():
    a = alloc("100-101")
    a.hold(100)
    assert a.allocate() == 101
    with pytest.raises(UidsExhausted):
        a.allocate()


def test_never_65535():
    a = alloc("65534-65536")
    assert a.allocate() == 65534 and a.allocate() == 65536
    with pytest.raises(UidsExhausted):
        a.allocate()


def test_real_accounts_are_skipped():
    assert has_account(0)
    nobody = 65534
    if has_account(nobody):
        a = UidAllocator(f"{nobody}-{nobody}", processes=set)
        with pytest.raises(UidsExhausted):
            a.allocate()


def test_process_scan_sees_our_own_uid_and_gid():
    ids = process_ids()
    assert os.getuid() in ids and os.getgid() in ids


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
def test_process_scan_sees_a_live_process_of_an_unlisted_uid():
    uid = 61234
    assert not has_account(uid)
    p = subprocess.Popen(["sleep", "30"],
                         user=uid, group=uid, extra_groups=[])
    try:
        deadline = time.monotonic() + 5
        while uid not in process_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        a = UidAllocator(f"{uid}-{uid + 1}")
        assert a.allocate() == uid + 1
    finally:
        p.kill()
        p.wait()
