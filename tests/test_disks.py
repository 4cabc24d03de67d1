"""Disks (issue 17): qsup reads the qcow2 chain itself and opens every file of it; QEMU gets fdsets
and an explicit ``-blockdev`` graph, never a path.  Also the spec side: the ``disks`` list, its caps
and layout, the old single ``disk``.

The chain rules (moved here from the jail's old chain walker, and stricter now): every file of a
chain opens by the image rule (beneath an image dir, no symlink, non-blocking, a regular file);
``json:``, protocol and missing backings, a backing without its declared format, loops and chains
deeper than ``MAX_BACKING_DEPTH`` are refused, each with a SpecError naming ``disks[N].path``.

qcow2 images are written here byte by byte (v3, header_length 104, the backing-format extension),
so each hostile header is exactly what it says; ``qemu-img`` (tests only) makes the real ones.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from core_harness import Bench
from supervisor import SpecError, load_config, parse_spec
from supervisor._disks import (
    OpenDisk,
    blockdevs,
    check_disks,
    device,
    node_name,
    open_disk,
    open_disks,
    read_qcow2,
    throttle,
    throttle_id,
)
from supervisor._qemu import HostFds, build_argv
from supervisor._records import Layout
from supervisor._spec import FIRST_SLOT, IO_LIMITS, MAX_BACKING_DEPTH, MAX_DISKS, MAX_NICS, DiskSpec

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

_BACKING_FORMAT = 0xE2792ACA


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def qcow2(path: Path, backing: str | None = None, fmt: str | None = "raw", *, size: int = 1 << 20,
          version: int = 3, header_length: int = 104, boff: int | None = None, bsize: int | None = None,
          exts: bytes | None = None, incompatible: int = 0) -> Path:
    """A qcow2 header as QEMU writes it: v3 (header_length 104) or v2 (72), then the header
    extensions (the backing format, when ``backing`` and ``fmt``), the end mark, the backing name.
    ``boff``/``bsize``/``header_length``/``exts``: what a hostile header says instead."""
    name = backing.encode() if backing is not None else b""
    if exts is None:
        exts = b""
        if backing is not None and fmt is not None:
            exts += struct.pack(">II", _BACKING_FORMAT, len(fmt)) + _pad8(fmt.encode())
        exts += struct.pack(">II", 0, 0)
    # where the extensions start (an absurd header_length is written, not padded to)
    start = 72 if version < 3 else max(104, min(header_length, 4096))
    at = (start + len(exts)) if backing is not None else 0
    boff = at if boff is None else boff
    head = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, boff, len(name) if bsize is None else bsize,
                       16, size, 0, 0, 0, 0, 0, 0, 0)
    if version >= 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
    data = head.ljust(start, b"\0") + exts + name
    path.write_bytes(data)
    return path


def raw(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qemu_img(*args: str) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, timeout=30)


def disk(path: Path | str, fmt: str = "qcow2", **kw) -> DiskSpec:
    return DiskSpec.model_validate({"id": "d0", "path": str(path), "format": fmt, **kw})


def refused(fn, *a, **kw) -> SpecError:
    with pytest.raises(SpecError) as e:
        fn(*a, **kw)
    return e.value


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def chain(where: str, d: DiskSpec, roots, **kw) -> list[tuple[str, str, bool, int]]:
    """``[(path, format, readonly, depth)]`` of the opened chain (closed again)."""
    od = open_disk(where, d, roots, **kw)
    try:
        return [(f.path, f.format, f.readonly, f.depth) for f in od.files]
    finally:
        od.close()


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


# -- read_qcow2 --------------------------------------------------------------------------------

def _header(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_qcow2(fd)
    finally:
        os.close(fd)


@needs_qemu_img
def test_read_qcow2_on_images_qemu_img_made(tmp_path):
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "base.raw"), "3M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "plain.qcow2"), "5M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(tmp_path / "top.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "top.qcow2"), "-F", "qcow2",
             str(tmp_path / "over.qcow2"), "7M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw",
             str(tmp_path / "v2.qcow2"))
    plain = _header(tmp_path / "plain.qcow2")
    assert (plain.version, plain.size, plain.backing, plain.backing_format) == (3, 5 << 20, None, None)
    top = _header(tmp_path / "top.qcow2")
    assert (top.version, top.size, top.backing, top.backing_format) == (3, 3 << 20, "base.raw", "raw")
    over = _header(tmp_path / "over.qcow2")
    assert (over.size, over.backing, over.backing_format) == (7 << 20, str(tmp_path / "top.qcow2"), "qcow2")
    v2 = _header(tmp_path / "v2.qcow2")
    assert (v2.version, v2.size, v2.backing, v2.backing_format) == (2, 3 << 20, "base.raw", "raw")
    assert _header(tmp_path / "base.raw") is None  # not a qcow2 image


def test_read_qcow2_on_headers_written_here(tmp_path):
    h = _header(qcow2(tmp_path / "a.qcow2", "b.raw", size=12345 * 512))
    assert (h.version, h.size, h.backing, h.backing_format) == (3, 12345 * 512, "b.raw", "raw")
    h = _header(qcow2(tmp_path / "b.qcow2", "c.qcow2", "qcow2", version=2))
    assert (h.version, h.backing, h.backing_format) == (2, "c.qcow2", "qcow2")
    h = _header(qcow2(tmp_path / "c.qcow2", "d.raw", fmt=None))  # no backing-format extension
    assert (h.backing, h.backing_format) == ("d.raw", None)
    # other extensions before the backing format are skipped (each padded to 8 bytes)
    other = struct.pack(">II", 0x6803F857, 5) + _pad8(b"hello")
    fmt = struct.pack(">II", _BACKING_FORMAT, 5) + _pad8(b"qcow2")
    h = _header(qcow2(tmp_path / "d.qcow2", "e.qcow2", exts=other + fmt + bytes(8)))
    assert h.backing_format == "qcow2"
    # a longer v3 header (QEMU 5.1 on writes 112): the extensions start after it
    h = _header(qcow2(tmp_path / "e.qcow2", "f.raw", header_length=112))
    assert (h.backing, h.backing_format) == ("f.raw", "raw")
    assert _header(qcow2(tmp_path / "f.qcow2")).backing is None
    (tmp_path / "short").write_bytes(b"QFI\xfb")
    assert _header(tmp_path / "short") is None


@pytest.mark.parametrize("kw, words", [
    (dict(bsize=0xFFFFFFFF), "backing file name of 4294967295 bytes"),   # huge backing name
    (dict(bsize=1024), "backing file name of 1024 bytes"),               # over QEMU's own 1023
    (dict(boff=1 << 40), "beyond the end"),                              # offset beyond EOF
    (dict(bsize=1000), "beyond the end"),                                # name runs past EOF
    (dict(header_length=72), "header length 72"),                        # v3 header shorter than v3's
    (dict(header_length=1 << 31), "header length"),                      # absurd header length
    (dict(version=4), "version 4"),
    (dict(version=1), "version 1"),
    (dict(exts=struct.pack(">II", _BACKING_FORMAT, 1 << 30)), "beyond the header"),  # extension length
    (dict(exts=struct.pack(">II", 0x1234, 0xFFFFFFF0)), "beyond the header"),
])
def test_hostile_headers_are_bounded_and_refused(tmp_path, images, kw, words):
    p = qcow2(images / "bad.qcow2", "b.raw", **kw)
    raw(images / "b.raw")
    with pytest.raises(ValueError, match=words):
        _header(p)
    before = fds()
    e = refused(open_disk, "disks[3]", disk(p), [images])
    assert e.field == "disks[3].path" and "not a usable qcow2 image" in str(e) and words in str(e), e
    assert fds() == before


def test_a_truncated_v3_header_and_bad_names_are_refused(tmp_path):
    p = tmp_path / "t.qcow2"
    p.write_bytes(qcow2(tmp_path / "full.qcow2").read_bytes()[:90])
    with pytest.raises(ValueError, match="truncated"):
        _header(p)
    with pytest.raises(ValueError, match="NUL"):
        _header(qcow2(tmp_path / "nul.qcow2", "a\0b"))
    p = qcow2(tmp_path / "utf.qcow2", "xx")
    data = bytearray(p.read_bytes())
    data[-2:] = b"\xff\xfe"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="UTF-8"):
        _header(p)


def test_an_external_data_file_is_refused(images):
    """QEMU's qcow2 driver opens a data file the header names by that name, whatever the graph
    says (checked: with an explicit graph a guest reads the named host file): refused like a
    backing outside the image dirs."""
    raw(images / "b.raw")
    qcow2(images / "df.qcow2", incompatible=1 << 2)
    qcow2(images / "top.qcow2", "df.qcow2", "qcow2")
    for name, where in (("df.qcow2", "disks[0]"), ("top.qcow2", "disks[1]")):
        e = refused(open_disk, where, disk(images / name), [images])
        assert e.field == f"{where}.path" and "external data file" in str(e), e
    qcow2(images / "other.qcow2", incompatible=1 << 1)  # another feature (corrupt bit): QEMU's to judge
    assert len(chain("disks[0]", disk(images / "other.qcow2"), [images])) == 1
    if QEMU_IMG is not None:
        # (qemu-img create creates and truncates the data file: only ever a file of the test's own)
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={images / 'data.raw'},data_file_raw=on",
                 str(images / "real.qcow2"), "1M")
        e = refused(open_disk, "disks[0]", disk(images / "real.qcow2"), [images])
        assert e.field == "disks[0].path" and "external data file" in str(e), e


# -- open_disk: the chain ------------------------------------------------------------------------

def test_relative_and_absolute_backing_names(tmp_path, images):
    other = tmp_path / "base"
    other.mkdir()
    base = raw(other / "base.raw", 3 << 20)
    qcow2(images / "mid.qcow2", str(base), size=3 << 20)           # absolute, in another image dir
    qcow2(images / "top.qcow2", "mid.qcow2", "qcow2", size=3 << 20)  # relative to top's directory
    d = disk(images / "top.qcow2")
    roots = [images, other]
    assert chain("disks[0]", d, roots) == [(str(images / "top.qcow2"), "qcow2", False, 0),
                                           (str(images / "mid.qcow2"), "qcow2", True, 1),
                                           (str(base), "raw", True, 2)]
    od = open_disk("disks[0]", d, roots)
    try:
        assert od.size == 3 << 20 and [f.size for f in od.files] == [3 << 20, 3 << 20, 3 << 20]
        # the image read-write, every backing file read-only (what QEMU's fdsets must match)
        modes = [fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_ACCMODE for f in od.files]
        assert modes == [os.O_RDWR, os.O_RDONLY, os.O_RDONLY]
        assert not any(os.get_inheritable(f.fd) for f in od.files)  # QEMU gets them by pass_fds only
    finally:
        od.close()
    assert all(f.fd == -1 for f in od.files)
    # a read-only disk: the image read-only too
    ro = open_disk("disks[0]", disk(images / "top.qcow2", readonly=True), roots)
    try:
        assert [f.readonly for f in ro.files] == [True, True, True]
        assert fcntl.fcntl(ro.files[0].fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        ro.close()


def test_the_declared_format_is_never_probed(images):
    # declared raw: a qcow2 header inside is the guest's data, no backing file is opened
    qcow2(images / "looks.qcow2", "/etc/shadow")
    assert chain("disks[0]", disk(images / "looks.qcow2", "raw"), [images]) == [
        (str(images / "looks.qcow2"), "raw", False, 0)]
    # declared qcow2 without a qcow2 header
    raw(images / "plain.img")
    e = refused(open_disk, "disks[1]", disk(images / "plain.img"), [images])
    assert e.field == "disks[1].path" and "no qcow2 header" in str(e), e


@pytest.mark.parametrize("name", [
    'json:{"file": {"driver": "file", "filename": "/etc/shadow"}}',
    "nbd:127.0.0.1:10809",
    "nbd+unix:///export?socket=/run/x.sock",
    "http://example.com/base.raw",
    "file:base.raw",
])
def test_json_and_protocol_backings_are_refused(images, name):
    qcow2(images / "d.qcow2", name)
    before = fds()
    e = refused(open_disk, "disks[2]", disk(images / "d.qcow2"), [images])
    assert e.field == "disks[2].path" and "no json: or protocol backing" in str(e), e
    assert fds() == before


def test_a_missing_backing_file_is_refused_not_left_to_qemu(images):
    qcow2(images / "d.qcow2", "missing.raw")
    e = refused(open_disk, "disks[1]", disk(images / "d.qcow2"), [images])
    assert e.field == "disks[1].path" and "does not exist" in str(e) and "missing.raw" in str(e), e


@pytest.mark.parametrize("fmt", [None, "vmdk", "", "raw\0"])
def test_a_backing_must_declare_raw_or_qcow2(images, fmt):
    raw(images / "b.raw")
    qcow2(images / "d.qcow2", "b.raw", fmt)
    e = refused(open_disk, "disks[0]", disk(images / "d.qcow2"), [images])
    assert e.field == "disks[0].path" and "without its format" in str(e) and "qemu-img -F" in str(e), e


@needs_qemu_img
def test_a_backing_without_format_made_by_qemu_img_is_refused(images):
    # qemu-img 7.2 insists on -F unless -u; an older one (or a tenant) writes none
    raw(images / "b.raw")
    qcow2(images / "old.qcow2", "b.raw", fmt=None)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(images / "new.qcow2"))
    assert [f[1] for f in chain("disks[0]", disk(images / "new.qcow2"), [images])] == ["qcow2", "raw"]
    e = refused(open_disk, "disks[0]", disk(images / "old.qcow2"), [images])
    assert e.field == "disks[0].path" and "without its format" in str(e), e


def test_loops_are_refused(images):
    qcow2(images / "a.qcow2", "b.qcow2", "qcow2")
    qcow2(images / "b.qcow2", "a.qcow2", "qcow2")
    qcow2(images / "self.qcow2", "./self.qcow2", "qcow2")
    for name in ("a.qcow2", "self.qcow2"):
        before = fds()
        e = refused(open_disk, "disks[0]", disk(images / name), [images])
        assert e.field == "disks[0].path" and "loops" in str(e), e
        assert fds() == before
    # the same file by another name (a hard link) is the same inode: a loop too
    os.link(images / "a.qcow2", images / "a2.qcow2")
    qcow2(images / "b.qcow2", "a2.qcow2", "qcow2")
    assert "loops" in str(refused(open_disk, "disks[0]", disk(images / "a.qcow2"), [images]))


def test_depth_is_capped(images):
    files = [images / f"c{i}.qcow2" for i in range(MAX_BACKING_DEPTH + 2)]
    for here, nxt in zip(files, files[1:]):
        qcow2(here, nxt.name, "qcow2")
    qcow2(files[-1])
    # the image and MAX_BACKING_DEPTH backing files: fine
    assert len(chain("disks[0]", disk(files[1]), [images])) == MAX_BACKING_DEPTH + 1
    before = fds()
    e = refused(open_disk, "disks[0]", disk(files[0]), [images])
    assert e.field == "disks[0].path" and f"deeper than {MAX_BACKING_DEPTH}" in str(e), e
    assert fds() == before


def test_never_follows_a_symlink_nor_blocks_on_a_fifo(images):
    fifo = images / "fifo.raw"
    os.mkfifo(fifo)
    raw(images / "real.raw")
    (images / "link.raw").symlink_to(images / "real.raw")
    qcow2(images / "on-fifo.qcow2", "fifo.raw")
    qcow2(images / "on-link.qcow2", "link.raw")
    (images / "top-link.qcow2").symlink_to(images / "on-link.qcow2")
    done = threading.Event()

    def unblock():  # code that blocks in open() is let go after 3 s (the test then fails on the time)
        while not done.wait(3):
            os.close(os.open(fifo, os.O_WRONLY))

    threading.Thread(target=unblock, daemon=True).start()
    t = time.monotonic()
    try:
        for d in (disk(images / "on-fifo.qcow2"), disk(fifo, "raw"), disk(fifo, "raw", readonly=True)):
            e = refused(open_disk, "disks[0]", d, [images])
            assert e.field == "disks[0].path" and "FIFO" in str(e) and str(fifo) in str(e), e
        e = refused(check_disks, [disk(images / "on-fifo.qcow2")], [images])  # the node's check
        assert e.field == "disks[0].path" and "FIFO" in str(e), e
    finally:
        done.set()
    assert time.monotonic() - t < 1
    for name in ("on-link.qcow2", "top-link.qcow2"):
        e = refused(open_disk, "disks[0]", disk(images / name), [images])
        assert e.field == "disks[0].path" and "symbolic link" in str(e), e


def test_backing_files_stay_inside_image_dirs(tmp_path, images):
    (images / "vm").mkdir()
    (tmp_path / "base").mkdir()
    raw(tmp_path / "base" / "base.raw")
    raw(images / "base.raw")
    top = images / "vm" / "top.qcow2"
    for name in ("../../base/base.raw", str(tmp_path / "base" / "base.raw"), "/etc/passwd"):
        qcow2(top, name)
        e = refused(open_disk, "disks[1]", disk(top), [images])
        assert e.field == "disks[1].path" and "image_dirs" in str(e) and "named by" in str(e), e
    qcow2(top, "../base.raw")  # relative, with "..", inside: opened at its own name
    assert chain("disks[0]", disk(top), [images]) == [(str(top), "qcow2", False, 0),
                                                       (str(images / "base.raw"), "raw", True, 1)]
    # the disk itself
    e = refused(open_disk, "disks[0]", disk(tmp_path / "base" / "base.raw", "raw"), [images])
    assert e.field == "disks[0].path" and "image_dirs" in str(e), e


def test_devices_only_as_a_disks_own_image_and_only_when_allowed(images):
    # (cache writeback: /dev/null takes no O_DIRECT)
    assert chain("disks[0]", disk("/dev/null", "raw", cache="writeback"), ["/dev"], allow_device=True) == [
        ("/dev/null", "raw", False, 0)]
    e = refused(open_disk, "disks[0]", disk("/dev/null", "raw"), ["/dev"])
    assert e.field == "disks[0].path" and "allow_device_disks" in str(e), e
    qcow2(images / "on-dev.qcow2", "/dev/null")  # a device as a backing file: never
    e = refused(open_disk, "disks[0]", disk(images / "on-dev.qcow2", cache="writeback"), [images, "/dev"],
                allow_device=True)
    assert e.field == "disks[0].path" and "device node" in str(e), e


def test_check_disks_opens_read_only_and_open_disks_is_all_or_none(images):
    raw(images / "a.raw", 4096)
    qcow2(images / "b.qcow2", "a.raw", size=8192)
    os.chmod(images / "a.raw", 0o400)  # root ignores it; the check never asks for write anyway
    d = [disk(images / "a.raw", "raw", id="a"), disk(images / "b.qcow2", id="b")]
    assert check_disks(d, [images]) == [4096, 8192]
    od = open_disk("disks[0]", d[0], [images], for_qemu=False)
    try:
        flags = fcntl.fcntl(od.files[0].fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_DIRECT
    finally:
        od.close()
    before = fds()
    bad = [*d, disk(images / "nope.raw", "raw", id="c")]
    e = refused(open_disks, bad, [images])
    assert e.field == "disks[2].path", e
    assert fds() == before  # the two opened before are closed again


def test_cache_modes_that_bypass_the_page_cache_open_with_o_direct(images):
    raw(images / "b.raw")
    qcow2(images / "t.qcow2", "b.raw")
    try:
        od = open_disk("disks[0]", disk(images / "t.qcow2", cache="none"), [images])
    except SpecError as e:
        assert e.field == "disks[0].cache", e
        pytest.skip(f"this file system takes no O_DIRECT: {e}")
    try:
        assert all(fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_DIRECT for f in od.files)
    finally:
        od.close()
    od = open_disk("disks[0]", disk(images / "t.qcow2", cache="writeback"), [images])
    try:
        assert not any(fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_DIRECT for f in od.files)
    finally:
        od.close()


# -- QEMU's side: the block graph, the device, the argv ------------------------------------------

def _opened(images: Path, d: DiskSpec) -> OpenDisk:
    return open_disk("disks[0]", d, [images])


def test_blockdevs_bottom_first_each_naming_its_backing(images):
    raw(images / "base.raw")
    qcow2(images / "mid.qcow2", "base.raw")
    qcow2(images / "top.qcow2", "mid.qcow2", "qcow2")
    od = _opened(images, disk(images / "top.qcow2", id="root", discard="unmap", cache="writeback"))
    try:
        nodes = blockdevs(od, [4, 5, 6])
    finally:
        od.close()
    assert [n["node-name"] for n in nodes] == ["file-root.b2", "disk-root.b2", "file-root.b1", "disk-root.b1",
                                               "file-root", "disk-root"]
    by = {n["node-name"]: n for n in nodes}
    # every node a node names exists before it (blockdev-add order)
    seen: set[str] = set()
    for n in nodes:
        for ref in (n.get("file"), n.get("backing")):
            assert ref is None or ref in seen, (n, seen)
        seen.add(str(n["node-name"]))
    # files: fdsets only, the image's writable, the backing files read-only
    assert [(by[f"file-root{s}"]["driver"], by[f"file-root{s}"]["filename"], by[f"file-root{s}"]["read-only"])
            for s in ("", ".b1", ".b2")] == [("file", "/dev/fdset/4", False), ("file", "/dev/fdset/5", True),
                                            ("file", "/dev/fdset/6", True)]
    assert (by["disk-root"]["driver"], by["disk-root"]["file"], by["disk-root"]["backing"]) == (
        "qcow2", "file-root", "disk-root.b1")
    assert (by["disk-root.b1"]["driver"], by["disk-root.b1"]["backing"], by["disk-root.b1"]["read-only"]) == (
        "qcow2", "disk-root.b2", True)
    assert by["disk-root.b2"]["driver"] == "raw" and "backing" not in by["disk-root.b2"]
    # discard only where QEMU may write
    assert by["disk-root"]["discard"] == "unmap" and by["disk-root.b1"]["discard"] == "ignore"
    assert by["file-root"]["cache"] == {"direct": False, "no-flush": False}
    assert not any("path" in k for n in nodes for k in n)  # no path anywhere, only /dev/fdset/N


def test_the_last_qcow2_of_a_chain_has_backing_null(images):
    qcow2(images / "base.qcow2")  # no backing file at all
    qcow2(images / "top.qcow2", "base.qcow2", "qcow2")
    od = _opened(images, disk(images / "top.qcow2", readonly=True))
    try:
        nodes = {n["node-name"]: n for n in blockdevs(od, [1, 2])}
    finally:
        od.close()
    # null: QEMU opens no backing by the name in the header
    assert "backing" in nodes["disk-d0.b1"] and nodes["disk-d0.b1"]["backing"] is None
    assert nodes["disk-d0"]["backing"] == "disk-d0.b1" and nodes["disk-d0"]["read-only"] is True
    od = _opened(images, disk(images / "base.qcow2"))
    try:
        assert blockdevs(od, [9])[-1]["backing"] is None
    finally:
        od.close()


def test_device_and_throttle():
    d = disk("/x.raw", "raw", id="data", serial="SN1", boot=1, discard="unmap", pci_slot=12)
    assert device(d) == {"driver": "virtio-blk-pci", "id": "blk-data", "drive": "disk-data", "addr": "0xc",
                         "write-cache": "on", "serial": "SN1", "bootindex": 1, "discard": True}
    plain = device(disk("/x.raw", "raw", cache="writethrough", readonly=True, discard="unmap", pci_slot=3))
    assert plain == {"driver": "virtio-blk-pci", "id": "blk-d0", "drive": "disk-d0", "addr": "0x3",
                     "write-cache": "off"}
    with pytest.raises(AssertionError):
        device(disk("/x.raw", "raw"))  # slots are given at create
    assert throttle(d) is None
    limited = disk("/x.raw", "raw", bps_rd=1000, iops=50)
    assert throttle(limited) == {"id": throttle_id("d0"), "bps": 0, "bps_rd": 1000, "bps_wr": 0, "iops": 50,
                                 "iops_rd": 0, "iops_wr": 0}
    assert node_name("d0", 2, "file") == "file-d0.b2"


def test_the_argv_holds_no_image_path(tmp_path, images):
    """kernel + initrd + two disks, one a qcow2 over a raw base: everything reaches QEMU as fds."""
    kernel, initrd = raw(images / "vmlinuz", 64), raw(images / "initrd", 64)
    raw(images / "base.raw")
    qcow2(images / "root.qcow2", "base.raw")
    raw(images / "data.img")
    spec = parse_spec({"name": "vm1", "memory": 96, "kernel": str(kernel), "initrd": str(initrd),
                       "nics": [{"mode": "routed", "ip": "10.0.0.1"}],
                       "disks": [{"id": "root", "path": str(images / "root.qcow2"), "format": "qcow2", "boot": 0},
                                 {"id": "data", "path": str(images / "data.img"), "format": "raw"}]}).with_layout()
    cfg = load_config(None, state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "r"), accel="tcg")
    opened = open_disks(spec.disks, [images])
    try:
        argv = build_argv(spec, cfg, Layout(cfg.state_dir, cfg.run_dir), [],
                          host=HostFds(qmp=10, operator_qmp=11, console=12, kernel=13, initrd=14), disks=opened)
        fds_ = [f.fd for od in opened for f in od.files]
    finally:
        for od in opened:
            od.close()
    assert not [a for a in argv if str(images) in a or ".qcow2" in a or ".raw" in a or ".img" in a], argv
    assert "-drive" not in argv
    add_fd = [argv[i + 1] for i, a in enumerate(argv) if a == "-add-fd"]
    assert [a.split(",")[:2] for a in add_fd] == [[f"fd={fds_[0]}", "set=1"], [f"fd={fds_[1]}", "set=2"],
                                                  [f"fd={fds_[2]}", "set=3"]]
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    files = {n["node-name"]: n["filename"] for n in nodes if n["driver"] == "file"}
    assert files == {"file-root": "/dev/fdset/1", "file-root.b1": "/dev/fdset/2", "file-data": "/dev/fdset/3"}
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("{")]
    assert [(d["id"], d["drive"], d["addr"], d.get("bootindex")) for d in devices] == [
        ("blk-root", "disk-root", "0x4", 0), ("blk-data", "disk-data", "0x5", None)]  # the NIC has slot 3
    # a node's fdset exists before it, a device's node before the device
    assert argv.index("-add-fd") < argv.index("-blockdev")
    last_blockdev = max(i for i, a in enumerate(argv) if a == "-blockdev" and "disk-root" in argv[i + 1])
    assert last_blockdev < argv.index(json.dumps(devices[0], separators=(",", ":")))


# -- the spec ------------------------------------------------------------------------------------

BASE = {"name": "vm1", "memory": 64, "kernel": "/boot/vmlinuz"}
NIC = {"mode": "routed", "ip": "10.0.0.1"}


def dsk(i: int = 0, **kw) -> dict:
    return {"id": f"d{i}", "path": f"/srv/d{i}.img", "format": "raw", **kw}


def spec_err(**kw) -> SpecError:
    return refused(parse_spec, {**BASE, **kw})


@pytest.mark.parametrize("kw, field, words", [
    (dict(disks=[dsk(i) for i in range(MAX_DISKS + 1)]), "disks", f"at most {MAX_DISKS}"),
    (dict(disks=[dsk(0), dsk(1), dsk(1, path="/srv/x.img")]), "disks[2].id", "duplicate disk id 'd1' (also disks[1])"),
    (dict(disks=[dsk(0, pci_slot=5), dsk(1, pci_slot=5)]), "disks[1].pci_slot", "also disks[0]'s"),
    (dict(nics=[dict(NIC, pci_slot=7)], disks=[dsk(0, pci_slot=7)]), "disks[0].pci_slot", "also nics[0]'s"),
    (dict(nics=[dict(NIC, pci_slot=7), dict(NIC, ip="10.0.0.2", pci_slot=7)]), "nics[1].pci_slot", "slot 7"),
    (dict(disks=[dsk(0, pci_slot=2)]), "disks[0].pci_slot", ""),  # pvpanic's
    (dict(disks=[dsk(0, pci_slot=32)]), "disks[0].pci_slot", ""),
    (dict(nics=[dict(NIC, pci_slot=1)]), "nics[0].pci_slot", ""),
    (dict(disks=[dsk(0, id="Root")]), "disks[0].id", "invalid disk id"),
    (dict(disks=[dsk(0, id="a" * 17)]), "disks[0].id", "invalid disk id"),
    (dict(disks=[dsk(0, id="a,b")]), "disks[0].id", "invalid disk id"),
    (dict(disks=[dsk(0, serial="a b")]), "disks[0].serial", "invalid serial"),
    (dict(disks=[dsk(0, serial="s" * 21)]), "disks[0].serial", "invalid serial"),
    (dict(machine="pc,accel=kvm"), "machine", "invalid machine type"),
    (dict(machine="PC"), "machine", "invalid machine type"),
    (dict(disks=[dsk(0, bps=1, bps_rd=1)]), "disks[0].bps", "excludes bps_rd/bps_wr"),
    (dict(disks=[dsk(0, bps=1, bps_wr=1)]), "disks[0].bps", "excludes"),
    (dict(disks=[dsk(0, iops=1, iops_wr=1)]), "disks[0].iops", "excludes iops_rd/iops_wr"),
    (dict(disks=[dsk(0, bps=0)]), "disks[0].bps", ""),
    (dict(disks=[dsk(0, iops_rd=10 ** 15 + 1)]), "disks[0].iops_rd", ""),
    (dict(disks=[{"id": "d0", "path": "/srv/d0.img"}]), "disks[0].format", "required field missing"),
    (dict(disks=[dsk(0, format="vmdk")]), "disks[0].format", ""),
    (dict(disks=[dsk(0, format=None)]), "disks[0].format", ""),  # never probed
    (dict(disks=[dsk(0, path="relative.img")]), "disks[0].path", "absolute"),
    (dict(disks=[dsk(0, path="/" + "p" * 4096)]), "disks[0].path", "longer than"),
    (dict(disks=[dsk(0, cache="auto")]), "disks[0].cache", ""),
    (dict(disks=[dsk(0, readonly="yes")]), "disks[0].readonly", ""),
    (dict(disks=[dsk(0, boot=100)]), "disks[0].boot", ""),
    (dict(disks=[dsk(0, colour="red")]), "disks[0].colour", "unknown field"),
    (dict(kernel=None), "kernel", "a kernel or at least one disk"),
    (dict(kernel=None, disks=[dsk(0)], initrd="/i"), "kernel", "initrd and append need kernel"),
])
def test_disk_spec_errors_name_the_field(kw, field, words):
    e = spec_err(**kw)
    assert e.field == field and words in e.message, (e.field, e.message)
    assert str(e).startswith(f"{field}: ")


def test_disk_spec_accepts_and_defaults():
    s = parse_spec({**BASE, "disks": [dsk(i) for i in range(MAX_DISKS)]})
    assert len(s.disks) == MAX_DISKS
    d = parse_spec({**BASE, "kernel": None, "disks": [dsk(0, path="/srv/a,b.img", bps_rd=5, bps_wr=6)]}).disks[0]
    assert (d.path, d.readonly, d.cache, d.discard, d.serial, d.boot, d.pci_slot) == (
        "/srv/a,b.img", False, "none", "ignore", None, None, None)  # ',' never reaches a QEMU option
    assert d.io_limits() == {"bps": 0, "bps_rd": 5, "bps_wr": 6, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    assert tuple(d.io_limits()) == IO_LIMITS
    assert parse_spec({**BASE, "machine": "pc-i440fx-7.2"}).machine == "pc-i440fx-7.2"
    assert parse_spec(BASE).machine is None  # pinned at the first start, not here


def test_with_layout_nics_first_then_disks_lowest_free_slot_explicit_kept():
    s = parse_spec({**BASE, "nics": [NIC, dict(NIC, ip="10.0.0.2", pci_slot=5)],
                    "disks": [dsk(0), dsk(1, pci_slot=3), dsk(2)]})
    laid = s.with_layout()
    assert [n.pci_slot for n in laid.nics] == [4, 5]
    assert [d.pci_slot for d in laid.disks] == [6, 3, 7]
    assert [n.pci_slot for n in s.nics] == [None, 5]  # the spec itself is unchanged (frozen)
    assert laid.with_layout() == laid  # once laid out, it stays
    assert laid.free_slot() == 8
    # without disks: what QEMU chose by itself before slots were fixed (pvpanic at 2, NICs next)
    plain = parse_spec({**BASE, "nics": [NIC, dict(NIC, ip="10.0.0.2")]}).with_layout()
    assert [n.pci_slot for n in plain.nics] == [FIRST_SLOT, FIRST_SLOT + 1]
    # the most devices a spec may have still fit
    full = parse_spec({**BASE, "nics": [dict(NIC, ip=f"10.0.0.{i + 1}") for i in range(MAX_NICS)],
                       "disks": [dsk(i) for i in range(MAX_DISKS)]}).with_layout()
    slots = [n.pci_slot for n in full.nics] + [d.pci_slot for d in full.disks]
    assert slots == list(range(FIRST_SLOT, FIRST_SLOT + MAX_NICS + MAX_DISKS))
    assert full.free_slot() == FIRST_SLOT + MAX_NICS + MAX_DISKS
    assert full.disk("d3").pci_slot == FIRST_SLOT + MAX_NICS + 3 and full.disk("nope") is None


@pytest.mark.parametrize("path, fmt", [("/srv/vm.qcow2", "qcow2"), ("/srv/vm.img", "raw"), ("/srv/vm.QCOW2", "raw"),
                                       ("/srv/vm.qcow2.bak", "raw")])
def test_the_old_single_disk_is_disks_0(path, fmt):
    s = parse_spec({"name": "vm1", "memory": 64, "disk": path})
    assert [(d.id, d.path, d.format, d.readonly, d.cache) for d in s.disks] == [("disk0", path, fmt, False, "none")]
    dumped = s.model_dump(mode="json")
    assert "disk" not in dumped and dumped["disks"][0]["id"] == "disk0"  # written back in the new shape
    assert parse_spec(dumped) == s
    # with a kernel (now allowed), or null (ignored)
    assert parse_spec({**BASE, "disk": path}).disks[0].path == path
    assert parse_spec({**BASE, "disk": None}).disks == []
    assert parse_spec({**BASE, "disk": None, "disks": [dsk(0)]}).disks[0].id == "d0"


def test_the_old_single_disk_refusals_name_it():
    e = spec_err(disk="/srv/a.img", disks=[dsk(0)])
    assert e.field == "disk" and "not disk" in e.message, e
    e = spec_err(disk="/srv/a.img", disks=[])
    assert e.field == "disk", e
    e = spec_err(disk=5)
    assert e.field == "disk" and "must be a path" in e.message, e
    e = spec_err(kernel=None, disk="relative.img")
    assert e.field == "disks[0].path", e


#: what a qsup before disks (78f626b^) recorded: the whole old InstanceSpec, disk and all
OLD_RECORD_SPEC = {"name": "vm", "memory": 64, "vcpus": 1, "kernel": None, "initrd": None, "append": None,
                   "disk": None, "accel": None, "nics": [], "tags": ["t"], "on_panic": None}


def test_a_record_of_the_old_shape_still_parses():
    s = parse_spec({**OLD_RECORD_SPEC, "disk": "/var/lib/qsup/images/vm.qcow2"})
    assert s.disks == [DiskSpec(id="disk0", path="/var/lib/qsup/images/vm.qcow2", format="qcow2")]
    assert s.machine is None and s.tags == ["t"]
    s = parse_spec({**OLD_RECORD_SPEC, "kernel": "/k", "nics": [NIC]})
    assert s.disks == [] and s.nics[0].pci_slot is None  # reattach keeps what QEMU has: no layout forced


@pytest.mark.usefixtures("no_fakes_left")
def test_an_instance_recorded_in_the_old_shape_is_reattached(tmp_path):
    """A QEMU started by a qsup before disks, its record holding the old spec: a new daemon
    reattaches it (the guest untouched), reads its ``disk`` as disks[0] and pins its machine."""
    raw(tmp_path / "vm.img")
    kernel = raw(tmp_path / "vmlinuz", 64)
    a = Bench(tmp_path)
    pid = []

    async def first():
        async with a.running():
            inst = await a.node.start(parse_spec({"name": "vm", "memory": 64, "kernel": str(kernel),
                                                   "disk": str(tmp_path / "vm.img")}))
            pid.append(inst.proc.pid)

    trio.run(first)
    path = a.dir / "state" / "instances" / "vm" / "record.json"
    rec = json.loads(path.read_text())
    assert rec["spec"]["machine"] == "pc-i440fx-7.2" and rec["spec"]["disks"][0]["pci_slot"] == FIRST_SLOT
    rec["spec"] = {**OLD_RECORD_SPEC, "kernel": str(kernel), "disk": str(tmp_path / "vm.img")}
    path.write_text(json.dumps(rec))

    async def second():
        async with a.running():
            assert a.reattached == ["vm"]
            inst = a.node.instances["vm"]
            assert inst.proc.pid == pid[0]
            assert [(d.id, d.format) for d in inst.spec.disks] == [("disk0", "raw")]
            assert inst.spec.machine == "pc-i440fx-7.2"  # pinned at reattach
            saved = json.loads(path.read_text())["spec"]
            assert "disk" not in saved and saved["machine"] == "pc-i440fx-7.2" and saved["disks"][0]["id"] == "disk0"
            await a.node.stop("vm", force=True)

    trio.run(second)
    assert a.state_left() == []
