"""Disks across a live migration (issue 17): shared or local, the source's offer checked as
hostile, the destination's target images (supervisor/_storage.py).  No root, no QEMU."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import httpx
import pytest
import trio

from supervisor import _storage as storage
from supervisor._config import load_config
from supervisor._disks import read_qcow2
from supervisor._migration import MigrationError, PeerClient, check_exports
from supervisor._spec import SpecError, parse_spec
from supervisor._storage import (
    Created,
    DiskOffer,
    check_offer,
    check_shared,
    create_targets,
    disk_refusal,
    local_disks,
    parse_offers,
    remove_created,
    write_empty_qcow2,
)


@pytest.fixture
def dirs(tmp_path):
    img = tmp_path / "images"
    shared = img / "shared"
    shared.mkdir(parents=True)
    return img, shared


def _spec(img, shared, **kw):
    kernel = img / "vmlinuz"
    kernel.write_bytes(b"k")
    disks = kw.pop("disks", [{"id": "boot", "path": str(shared / "boot.raw"), "format": "raw"},
                             {"id": "data", "path": str(img / "data.qcow2"), "format": "qcow2"}])
    return parse_spec({"name": "vm", "memory": 64, "kernel": str(kernel), "disks": disks, **kw})


# -- classification -------------------------------------------------------------------------------

def test_disks_beneath_shared_dirs_are_shared_every_other_local(dirs):
    img, shared = dirs
    spec = _spec(img, shared)
    assert [d.id for _, d in local_disks(spec, [shared])] == ["data"]
    assert [i for i, _ in local_disks(spec, [])] == [0, 1]
    assert storage.is_shared(str(shared / "sub" / "x.raw"), [shared])
    assert not storage.is_shared(str(img / "sharedx" / "x.raw"), [shared])  # a prefix is not a parent


def test_config_shared_image_dirs_must_lie_inside_image_dirs(dirs, tmp_path):
    img, shared = dirs
    cfg = load_config(None, image_dirs=[str(img)], shared_image_dirs=[str(shared)])
    assert cfg.shared_image_dirs == [shared]
    with pytest.raises(SpecError) as e:
        load_config(None, image_dirs=[str(img)], shared_image_dirs=[str(shared), str(tmp_path / "elsewhere")])
    assert e.value.field == "shared_image_dirs[1]"


def test_refusal_names_the_local_disk_until_nbd_works(dirs, monkeypatch):
    img, shared = dirs
    spec = _spec(img, shared)
    assert disk_refusal(_spec(img, shared, disks=[{"id": "a", "path": str(shared / "a"), "format": "raw"}]),
                        [shared], postcopy=True) is None
    monkeypatch.setattr(storage, "LOCAL_DISK_MIGRATION", False)
    why = disk_refusal(spec, [shared], postcopy=False)
    assert why is not None and why[1] == "disks[1]" and "'data'" in why[0]
    monkeypatch.setattr(storage, "LOCAL_DISK_MIGRATION", True)
    assert disk_refusal(spec, [shared], postcopy=False) is None
    assert disk_refusal(spec, [shared], postcopy=True)[1] == "postcopy"


# -- the source's offer, as the destination sees it -----------------------------------------------

def _offer(**kw):
    return {"id": "boot", "format": "raw", "size": 1 << 20, "shared": True, **kw}


@pytest.mark.parametrize("bad, field", [
    ("not a list", "disks"),
    ([_offer()] * 9, "disks"),
    ([_offer(size=0)], "disks[0]"),
    ([_offer(size=-1)], "disks[0]"),
    ([_offer(size=1 << 60)], "disks[0]"),
    ([_offer(size="1")], "disks[0]"),
    ([_offer(size=True)], "disks[0]"),
    ([_offer(), _offer(id="../x")], "disks[1]"),
    ([_offer(id="a\n")], "disks[0]"),
    ([_offer(format="vmdk")], "disks[0]"),
    ([_offer(shared="yes")], "disks[0]"),
    ([_offer(path="/etc/passwd")], "disks[0]"),  # no extra keys: nothing a peer sends is used unchecked
    ([{"id": "boot"}], "disks[0]"),
])
def test_hostile_offers_are_refused_naming_the_disk(bad, field):
    with pytest.raises(SpecError) as e:
        parse_offers(bad)
    assert e.value.field == field


def test_offer_must_match_the_spec_and_this_nodes_classification(dirs):
    img, shared = dirs
    spec = _spec(img, shared)
    good = [DiskOffer(id="boot", format="raw", size=1, shared=True),
            DiskOffer(id="data", format="qcow2", size=1, shared=False)]
    check_offer(spec, good, [shared])
    for offers, field in (
        (good[:1], "disks"),
        ([good[1], good[0]], "disks[0]"),
        ([good[0], good[1].model_copy(update={"format": "raw"})], "disks[1]"),
        ([good[0], good[1].model_copy(update={"shared": True})], "disks[1]"),  # local here
        ([good[0].model_copy(update={"shared": False}), good[1]], "disks[0]"),  # shared here
    ):
        with pytest.raises(SpecError) as e:
            check_offer(spec, offers, [shared])
        assert e.value.field == field, offers


def test_shared_disk_reopened_and_its_size_checked(dirs):
    img, shared = dirs
    spec = _spec(img, shared)
    (shared / "boot.raw").write_bytes(b"\0" * 8192)
    check_shared("disks[0]", spec.disks[0], DiskOffer(id="boot", format="raw", size=8192, shared=True), [img])
    with pytest.raises(SpecError) as e:
        check_shared("disks[0]", spec.disks[0], DiskOffer(id="boot", format="raw", size=4096, shared=True), [img])
    assert e.value.field == "disks[0].path" and "8192" in e.value.message


def test_prepare_without_an_offer_for_a_spec_with_disks_is_refused(dirs, tmp_path):
    from core_harness import Bench

    img, shared = dirs
    spec = _spec(img, shared)

    async def main():
        b = Bench(tmp_path, "b", image_dirs=[str(img)], shared_image_dirs=[str(shared)])
        async with b.running():
            with pytest.raises(SpecError) as e:
                await b.node.prepare_incoming(spec)
            assert e.value.field == "disks"
            with pytest.raises(SpecError) as e:
                await b.node.prepare_incoming(spec, disks=[_offer(size=1)])
            assert e.value.field == "disks"
            assert b.node.instances == {}
    trio.run(main)


def test_migrate_route_refuses_a_local_disk_naming_it(dirs, tmp_path, monkeypatch):
    """The source's route: 422 naming disks[i] before anything is contacted (while local-disk
    migration is off), and naming postcopy for a local disk with post-copy."""
    from core_harness import Bench

    img, shared = dirs
    (shared / "boot.raw").write_bytes(b"\0" * 4096)
    (img / "data.raw").write_bytes(b"\0" * 4096)
    disks = [{"id": "boot", "path": str(shared / "boot.raw"), "format": "raw"},
             {"id": "data", "path": str(img / "data.raw"), "format": "raw"}]
    spec = _spec(img, shared, disks=disks)

    async def main():
        a = Bench(tmp_path, "a", image_dirs=[str(img)], shared_image_dirs=[str(shared)],
                  peers={"b": f"unix:{tmp_path / 'nowhere.sock'}"})
        async with a.running(api=True):
            await a.node.start(spec)
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(a.socket)),
                                         base_url="http://qsup") as c:
                monkeypatch.setattr(storage, "LOCAL_DISK_MIGRATION", False)
                r = await c.post("/v1/instances/vm/migrate", json={"to": "b"})
                assert r.status_code == 422 and r.json()["field"] == "disks[1]", r.text
                monkeypatch.setattr(storage, "LOCAL_DISK_MIGRATION", True)
                r = await c.post("/v1/instances/vm/migrate", json={"to": "b", "postcopy": True})
                assert r.status_code == 422 and r.json()["field"] == "postcopy", r.text
            assert a.node.get("vm").migration is None
            await a.node.stop("vm", force=True)
    trio.run(main)


# -- target images ---------------------------------------------------------------------------------

def test_targets_created_0600_raw_sparse_qcow2_empty(dirs):
    img, shared = dirs
    spec = _spec(img, shared, disks=[{"id": "r", "path": str(img / "sub" / "r.raw"), "format": "raw"},
                                     {"id": "q", "path": str(img / "q.qcow2"), "format": "qcow2"}])
    (img / "sub").mkdir()
    opened, created = create_targets([(0, spec.disks[0], 3 << 20), (1, spec.disks[1], (1 << 30) + 512)], [img])
    try:
        assert [c.disk_id for c in created] == ["r", "q"]
        st = os.stat(img / "sub" / "r.raw")
        assert st.st_mode & 0o777 == 0o600 and st.st_size == 3 << 20
        assert os.stat(img / "q.qcow2").st_mode & 0o777 == 0o600
        assert [od.files[0].size for od in opened] == [3 << 20, (1 << 30) + 512]
        assert all(not od.files[0].readonly for od in opened)
        assert all(fcntl.fcntl(od.files[0].fd, fcntl.F_GETFL) & os.O_DIRECT for od in opened)  # cache none
        with open(img / "q.qcow2", "rb") as f:
            h = read_qcow2(f.fileno())
        assert h is not None and h.version == 3 and h.size == (1 << 30) + 512 and h.backing is None
        if shutil.which("qemu-img"):  # our own file: qemu-img may look at it
            r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(img / "q.qcow2")], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for od in opened:
            od.close()
    assert remove_created(created) == []
    assert not (img / "sub" / "r.raw").exists() and not (img / "q.qcow2").exists()


def test_an_existing_file_is_refused_never_opened(dirs):
    img, shared = dirs
    spec = _spec(img, shared)
    (img / "data.qcow2").write_bytes(b"someone's image")
    with pytest.raises(SpecError) as e:
        create_targets([(1, spec.disks[1], 1 << 20)], [img])
    assert e.value.field == "disks[1].path" and "already exists" in e.value.message
    assert (img / "data.qcow2").read_bytes() == b"someone's image"


def test_symlinked_directory_below_the_image_dir_is_refused(dirs, tmp_path):
    img, shared = dirs
    (tmp_path / "outside").mkdir()
    (img / "link").symlink_to(tmp_path / "outside")
    spec = _spec(img, shared, disks=[{"id": "x", "path": str(img / "link" / "x.raw"), "format": "raw"}])
    with pytest.raises(SpecError) as e:
        create_targets([(0, spec.disks[0], 1 << 20)], [img])
    assert e.value.field == "disks[0].path"
    assert list((tmp_path / "outside").iterdir()) == []


def test_short_space_refused_naming_the_disk_all_or_none(dirs, monkeypatch):
    img, shared = dirs
    spec = _spec(img, shared, disks=[{"id": "a", "path": str(img / "a.raw"), "format": "raw"},
                                     {"id": "b", "path": str(img / "b.raw"), "format": "raw"}])
    real = os.fstatvfs

    class Vfs:
        def __init__(self, fd):
            v = real(fd)
            self.f_frsize = 1
            self.f_bavail = min(v.f_bavail * v.f_frsize, 100 << 20)

    monkeypatch.setattr(os, "fstatvfs", Vfs)
    with pytest.raises(SpecError) as e:  # each fits alone, not both
        create_targets([(0, spec.disks[0], 60 << 20), (1, spec.disks[1], 60 << 20)], [img])
    assert e.value.field == "disks[1]" and "not enough space" in e.value.message
    assert not (img / "a.raw").exists() and not (img / "b.raw").exists()


def test_a_failure_half_way_removes_what_was_created(dirs):
    img, shared = dirs
    spec = _spec(img, shared, disks=[{"id": "a", "path": str(img / "a.raw"), "format": "raw"},
                                     {"id": "b", "path": str(img / "b.raw"), "format": "raw"}])
    (img / "b.raw").write_bytes(b"there")
    with pytest.raises(SpecError) as e:
        create_targets([(0, spec.disks[0], 1 << 20), (1, spec.disks[1], 1 << 20)], [img])
    assert e.value.field == "disks[1].path"
    assert not (img / "a.raw").exists() and (img / "b.raw").read_bytes() == b"there"


def test_remove_created_deletes_only_the_file_it_created(dirs):
    img, _ = dirs
    p = img / "t.raw"
    p.write_bytes(b"x")
    st = os.stat(p)
    c = Created("t", str(p), st.st_dev, st.st_ino)
    other = img / "t.new"
    other.write_bytes(b"another file at that path")  # made while the first still exists: a new inode
    os.replace(other, p)
    assert os.stat(p).st_ino != st.st_ino
    assert remove_created([c]) == []
    assert p.read_bytes() == b"another file at that path"
    assert Created.from_record(c.record()) == c
    assert Created.from_record({"disk": "t", "path": 1}) is None


def test_empty_qcow2_layout():
    assert storage.qcow2_layout(1 << 30) == (2, 1, 4)
    assert storage.qcow2_layout(1) == (1, 1, 4)
    assert storage.qcow2_layout(1 << 40) == (2048, 1, 4)


def test_write_empty_qcow2_readable_by_qsup(tmp_path):
    fd = os.open(tmp_path / "e.qcow2", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_empty_qcow2(fd, 5 << 20)
        h = read_qcow2(fd)
        assert h is not None and h.size == 5 << 20
    finally:
        os.close(fd)


# -- the prepare answer's NBD part, as the source sees it -------------------------------------------

def _answer(**kw):
    return {"name": "vm", "port": 4444, "tls": False, **kw}


@pytest.mark.parametrize("nbd, local, ok", [
    ({"port": 10809, "exports": ["data"]}, ["data"], True),
    (None, [], True),
    (None, ["data"], False),  # local disks but no exports
    ({"port": 10809, "exports": ["data"]}, [], False),  # exports nobody asked for
    ({"port": 10809, "exports": ["boot"]}, ["data"], False),
    ({"port": 10809, "exports": ["data", "data"]}, ["data"], False),
    ({"port": 0, "exports": ["data"]}, ["data"], False),
    ({"port": 70000, "exports": ["data"]}, ["data"], False),
    ({"port": "10809", "exports": ["data"]}, ["data"], False),
    ({"port": 10809, "exports": ["../data"]}, ["data"], False),
    ({"port": 10809, "exports": "data"}, ["data"], False),
    ({"port": 10809, "exports": ["data"], "host": "evil.example"}, ["data"], True),  # ignored, never used
])
def test_prepare_answer_nbd_part_validated(nbd, local, ok):
    body = _answer(**({"nbd": nbd} if nbd is not None else {}))
    if ok:
        answer = PeerClient.prepared("vm", body)
        check_exports(answer, local)
    else:
        with pytest.raises(MigrationError) as e:
            check_exports(PeerClient.prepared("vm", body), local)
        assert e.value.field == "to"
