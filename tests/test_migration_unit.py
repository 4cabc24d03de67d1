"""Pure pieces of the migration module: URIs, ports, progress, the switchover window."""

import socket

import pytest

from supervisor._migration import (
    Activation,
    MigrateOptions,
    MigrationError,
    OutgoingMigration,
    PeerView,
    PrepareAnswer,
    Progress,
    _peer_answer,
    free_port,
    parse_tcp_uri,
    tcp_uri,
)


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
    m.activation = Activation(qmp_ts=10.0)
    assert m.switchover_ms() is None  # no STOP seen yet
    m.on_stop(9.9875)
    assert m.switchover_ms() == 12.5
    m.activation = None
    assert m.switchover_ms() is None
    v = m.view()
    assert v["direction"] == "out" and v["to"] == "/x.sock" and v["result"] is None


@pytest.mark.parametrize("uri", [
    "exec:touch /tmp/pwned", "unix:/run/x.sock", "fd:3", "tcp:evil.example:4444", "tcp:10.0.0.1:0",
    "tcp:10.0.0.1:70000", "tcp:10.0.0.1", "tcp:[10.0.0.1]:5", "tcp:10.0.0.1:5\n", "rdma:10.0.0.1:5", "",
])
def test_a_peer_can_only_name_a_tcp_address_and_port(uri):
    with pytest.raises(ValueError):
        parse_tcp_uri(uri)


def test_tcp_uris_parse():
    assert parse_tcp_uri("tcp:10.0.0.2:4444") == ("10.0.0.2", 4444)
    assert parse_tcp_uri("tcp:[fd00::2]:4444") == ("fd00::2", 4444)


@pytest.mark.parametrize("body, what", [
    ({"name": "vm"}, "port"),
    ({"name": "vm", "port": "4444"}, "port"),
    ({"name": "vm", "port": 0}, "port"),
    ({"name": "vm", "port": 70000}, "port"),
    ({"name": "vm", "port": True}, "port"),
    ([], "body"),
    (None, "body"),
    ({"port": 4444}, "name"),
])
def test_invalid_prepare_answers_are_a_migration_error_naming_the_part(body, what):
    with pytest.raises(MigrationError) as e:
        _peer_answer(PrepareAnswer, body, "prepare answer")
    assert e.value.field == "to" and what in str(e.value)


def test_peer_view_ignores_extra_fields_but_checks_types():
    v = _peer_answer(PeerView, {"name": "vm", "state": "running", "extra": 1,
                                "migration": {"activation": {"qmp_ts": 1.5, "netconf_ms": 0.3}}}, "view")
    assert v.migration.activation.netconf_ms == 0.3
    with pytest.raises(MigrationError):
        _peer_answer(PeerView, {"name": "vm", "state": "running",
                                "migration": {"activation": {"qmp_ts": "soon"}}}, "view")


def test_a_peer_cannot_supply_a_uri_scheme():
    """An ``exec:`` (or any) ``uri`` in the answer is ignored: the source builds tcp:ADDR:PORT itself."""
    a = _peer_answer(PrepareAnswer, {"name": "vm", "port": 4444, "uri": "exec:touch /tmp/pwned"}, "answer")
    assert a.port == 4444 and not hasattr(a, "uri")
