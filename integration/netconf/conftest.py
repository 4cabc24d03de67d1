"""Fixtures for netconf integration tests: every test gets its own namespace.

Each fixture removes what it made in ``finally`` order: agents (killed by
pid), OVS daemons (by pid), then the namespace itself.
"""

from __future__ import annotations

import pytest

from nsutil import Agent, Netns, Ovs


@pytest.fixture
def ns():
    n = Netns()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def agents(ns):
    made: list[Agent] = []

    def start(env: dict | None = None, where: Netns | None = None) -> Agent:
        a = Agent(where or ns, env)
        made.append(a)
        return a

    try:
        yield start
    finally:
        for a in reversed(made):
            a.kill()
            a.close()


@pytest.fixture
def agent(agents):
    return agents()


@pytest.fixture
def ovs(ns, tmp_path):
    o = Ovs(ns, tmp_path / "ovs")
    try:
        yield o
    finally:
        o.close()
