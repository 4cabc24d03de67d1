"""Pure pieces of the migration module: URIs, ports, progress, the switchover window."""

import socket

from supervisor._migration import MigrateOptions, OutgoingMigration, Progress, free_port, tcp_uri


def test_tcp_uri_brackets_ipv6():
    assert tcp_uri("10.0.0.1", 4444) == "tcp:10.0.0.1:4444"
    assert tcp_uri("fd00::1", 4444) == "tcp:[fd00::1]:4444"


def test_free_port_is_bindable_and_never_connected_to():
    port = free_port("127.0.0.1")
    with socket.socket() as s:  # nothing listens there and we can bind it again
        s.bind(("127.0.0.1", port))


def test_progress_keeps_last_known_values():
    p = Progress()
    p.update({"status": "active", "ram": {"transferred": 10, "remaining": 90, "total": 100, "mbps": 1.5}})
    p.update({"status": "completed", "downtime": 12, "total-time": 800})
    assert (p.status, p.transferred, p.remaining, p.total, p.downtime_ms, p.total_time_ms) == (
        "completed", 10, 90, 100, 12, 800)


class _Inst:
    name = "vm"


def test_switchover_window_uses_qemu_timestamps():
    m = OutgoingMigration(_Inst(), MigrateOptions(to="/x.sock"))
    assert m.switchover_ms({"qmp_ts": 10.0}) is None  # no STOP seen yet
    m.stop_ts = 9.9875
    assert m.switchover_ms({"qmp_ts": 10.0}) == 12.5
    assert m.switchover_ms(None) is None
    v = m.view()
    assert v["direction"] == "out" and v["to"] == "/x.sock" and v["result"] is None
