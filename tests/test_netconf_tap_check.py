"""tap_name_for, routing-table resolution and check_link's routed checks (no root)."""

import pytest

from netconf import NetconfError, Nic, check_link, tap_name_for
from netconf._check import resolve_table, table_names


def test_tap_name_is_stable_short_and_distinct():
    a = tap_name_for("vm1", "52:54:00:00:00:01")
    assert a == tap_name_for("vm1", "52:54:00:00:00:01".upper())
    assert a.startswith("qs") and len(a) <= 15
    assert a != tap_name_for("vm1", "52:54:00:00:00:02")
    assert a != tap_name_for("vm2", "52:54:00:00:00:01")
    assert len(tap_name_for("x" * 63, "52:54:00:00:00:01")) <= 15


def test_table_names_and_resolution(tmp_path):
    f = tmp_path / "rt_tables"
    f.write_text("# comment\n255 local\n254 main\n100\tguests # trailing\nbad line\n")
    assert table_names([str(f)]) == {"local": 255, "main": 254, "guests": 100}
    assert resolve_table("guests", [str(f)]) == 100
    assert resolve_table("4294967295", [str(f)]) == 2**32 - 1
    assert resolve_table(7) == 7
    with pytest.raises(ValueError, match="out of range"):
        resolve_table("0", [str(f)])
    with pytest.raises(ValueError, match="out of range"):
        resolve_table(str(2**32), [str(f)])
    with pytest.raises(ValueError, match="not named"):
        resolve_table("nosuch", [str(f)])


def test_check_link_routed_names_the_field():
    n = Nic("vm", "52:54:00:00:00:01", "routed", "qs1", link="no-such-table-x", ip="10.0.0.1")
    with pytest.raises(NetconfError, match=r"^nics\[2\]\.link: routing table 'no-such-table-x'"):
        check_link(n, 2)
    check_link(Nic("vm", "52:54:00:00:00:01", "routed", "qs1", link="100", ip="10.0.0.1"), 0)
    check_link(Nic("vm", "52:54:00:00:00:01", "routed", "qs1", ip="10.0.0.1"), 0)


def test_check_link_bridge_missing():
    n = Nic("vm", "52:54:00:00:00:01", "bridged", "qs1", link="br-nope-9")
    with pytest.raises(NetconfError, match=r"^nics\[0\]\.link: bridge 'br-nope-9' does not exist$"):
        check_link(n, 0)
    with pytest.raises(NetconfError, match=r"nics\[1\]\.link: mode bridged needs a link"):
        check_link(Nic("vm", "52:54:00:00:00:01", "bridged", "qs1"), 1)


def test_check_link_not_a_bridge():
    with pytest.raises(NetconfError, match="'lo' exists but is not a Linux bridge"):
        check_link(Nic("vm", "52:54:00:00:00:01", "bridged", "qs1", link="lo"), 0)


def test_check_link_without_index_names_the_nic_relative_field():
    with pytest.raises(NetconfError, match=r"^link: bridge 'br-nope-9' does not exist$"):
        check_link(Nic("vm", "52:54:00:00:00:01", "bridged", "qs1", link="br-nope-9"))


@pytest.mark.parametrize("queues", [1, 3])
def test_open_tap_creates_the_tap_exclusively(monkeypatch, queues):
    """IFF_TUN_EXCL on the first TUNSETIFF: a tap of that name that exists already (someone
    else's, or another instance's) is refused with EBUSY, never attached to (issue 16).  The
    further queues of a multiqueue tap attach to the one just made, without it."""
    import struct

    from netconf import _tap

    calls = []
    fds = iter(range(100, 200))
    monkeypatch.setattr(_tap.os, "open", lambda path, flags: next(fds))
    monkeypatch.setattr(_tap.os, "close", lambda fd: None)

    def ioctl(fd, req, arg):
        if req == _tap.TUNGETFEATURES:
            return struct.pack("I", _tap.IFF_VNET_HDR | _tap.IFF_MULTI_QUEUE | 0x8000)
        calls.append((fd, struct.unpack("16sH22x", arg)[1]))
        return arg

    monkeypatch.setattr(_tap.fcntl, "ioctl", ioctl)
    h = _tap.open_tap("qs0123456789abc", queues)
    assert len(h.fds) == queues and len(calls) == queues
    assert calls[0][1] & 0x8000, "the first TUNSETIFF must carry IFF_TUN_EXCL"
    assert all(not flags & 0x8000 for _, flags in calls[1:])
