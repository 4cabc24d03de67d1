"""migtopo.ping_counts: loss from ping's own totals (no namespace, no qemu: fast).

The migration tests' loss budget is only as good as this count, so it is pinned
down on ping's real output shapes: trailing loss counts, error lines are not
replies, and output without totals is an error rather than "no loss".
"""

from __future__ import annotations

import pytest

from migtopo import PingError, ping_counts


def reply(seq: int) -> str:
    return f"[1700000000.{seq:06d}] 64 bytes from 10.99.0.2: icmp_seq={seq} ttl=63 time=0.9 ms\n"


def unreachable(seq: int) -> str:
    return f"[1700000000.{seq:06d}] From 192.168.100.2 icmp_seq={seq} Destination Host Unreachable\n"


def totals(sent: int, received: int, errors: int = 0) -> str:
    err = f", +{errors} errors" if errors else ""
    return (f"\n--- 10.99.0.2 ping statistics ---\n{sent} packets transmitted, {received} received{err}, "
            f"{100 * (sent - received) // max(sent, 1)}% packet loss, time 1000ms\n")


HEAD = "PING 10.99.0.2 (10.99.0.2) 56(84) bytes of data.\n"


def test_no_loss():
    out = HEAD + "".join(reply(i) for i in range(1, 11)) + totals(10, 10)
    assert ping_counts(out)["lost"] == 0


def test_trailing_loss_counts():
    """The guest stops answering after seq 5 and never comes back: 5 lost, not 0."""
    out = HEAD + "".join(reply(i) for i in range(1, 6)) + totals(10, 5)
    c = ping_counts(out)
    assert (c["sent"], c["received"]) == (10, 5)
    assert c["lost"] == 4  # seq 10 was the last request, sent just before the interrupt


def test_the_last_request_in_flight_is_not_a_loss():
    out = HEAD + "".join(reply(i) for i in range(1, 10)) + totals(10, 9)
    assert ping_counts(out)["lost"] == 0


def test_unreachable_lines_are_not_replies():
    out = HEAD + reply(1) + "".join(unreachable(i) for i in range(2, 9)) + reply(9) + reply(10) + totals(10, 3, 7)
    c = ping_counts(out)
    assert c["seqs"] == [1, 9, 10]
    assert c["lost"] == 7


@pytest.mark.parametrize("out", ["", HEAD, HEAD + reply(1) + reply(2), "ping: connect: Network is unreachable\n"])
def test_output_without_totals_is_an_error(out):
    with pytest.raises(PingError):
        ping_counts(out)


def test_totals_that_disagree_with_the_replies_are_an_error():
    with pytest.raises(PingError):
        ping_counts(HEAD + reply(1) + totals(3, 2))
