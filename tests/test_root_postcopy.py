"""allow_root_postcopy: a root QEMU only where it must be, and then only with image_dirs (issue 16).

A post-copy destination's QEMU needs userfaultfd.  Where the host lets unprivileged processes
have it (vm.unprivileged_userfaultfd = 1) QEMU runs as its own uid like every other; only
where it doesn't does ``allow_root_postcopy`` run it as root -- for the guest's whole life,
with its disk opened read-write by root -- and then only on a node whose ``image_dirs``
confine every image.
"""

from __future__ import annotations

import io

import pytest
import trio

from core_harness import Bench, spec
from supervisor._instance import Instance
from supervisor._migration import IncomingMigration
from supervisor._spec import SpecError

pytestmark = pytest.mark.usefixtures("no_fakes_left")
SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"


def _sysctl(monkeypatch, value: str) -> None:
    real = open

    def fake(path, *a, **kw):
        if str(path) == SYSCTL:
            return io.StringIO(value + "\n")
        return real(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake)


def test_a_postcopy_destination_runs_unprivileged_where_the_host_allows_userfaultfd(tmp_path, monkeypatch):
    b = Bench(tmp_path, "b", qemu_user="per-instance", allow_root_postcopy=True, image_dirs=[str(tmp_path)])

    async def main():
        async with b.running():
            inst = Instance(spec(tmp_path), b.node.ctx)
            inst.migration = IncomingMigration(inst, True, release_wait=1)
            _sysctl(monkeypatch, "1")
            assert not inst._needs_root(), "userfaultfd is open to QEMU's own uid: no root QEMU"
            monkeypatch.undo()
            _sysctl(monkeypatch, "0")
            assert inst._needs_root()

    trio.run(main)


def test_root_postcopy_needs_image_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr("supervisor._node.os.geteuid", lambda: 0)
    _sysctl(monkeypatch, "0")
    b = Bench(tmp_path, "b", qemu_user="per-instance", allow_root_postcopy=True, image_dirs=["/"])  # anywhere

    async def main():
        async with b.running():
            with pytest.raises(SpecError) as e:
                await b.node.prepare_incoming(spec(tmp_path), postcopy=True)
            assert e.value.field == "postcopy" and "image_dirs" in str(e.value), e.value
            assert b.types() == [] and b.state_left() == []

    trio.run(main)
    from supervisor._node import Node

    confined = Bench(tmp_path, "c", qemu_user="per-instance", allow_root_postcopy=True, image_dirs=[str(tmp_path)])
    Node(confined.cfg, confined.events)._check_postcopy()  # root post-copy, images confined: allowed
    _sysctl(monkeypatch, "1")
    Node(b.cfg, b.events)._check_postcopy()  # no root needed: image_dirs does not matter
