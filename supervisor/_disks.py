"""Disks: qsup opens every file of every disk; QEMU gets descriptors and a fixed block graph.

Why, and how:

* **No path reaches QEMU.**  Each disk's image and every file of its qcow2 backing chain is
  opened by qsup by the rule of :mod:`supervisor._images` (beneath an image dir, no symlink,
  non-blocking, ``fstat``: a regular file; a block device only as a disk's own image and only
  with ``allow_device_disks``), and passed in a QEMU *fdset* (``-add-fd``; ``add-fd`` when
  hotplugged).  QEMU names it ``/dev/fdset/N`` and needs no permission on the file, so images
  can be 0600 root although QEMU runs as a per-instance uid.
* **qsup reads the chain itself**, from the qcow2 headers (:func:`read_qcow2`), on the
  descriptor it opened; it never runs ``qemu-img`` as root on an image a tenant may have
  written.  ``json:`` and protocol backings (``nbd:``, ``http:``...) are refused, as is a
  backing without a declared format (QEMU would probe it), a missing file, a loop, a chain
  deeper than :data:`~supervisor._spec.MAX_BACKING_DEPTH` and an external data file (QEMU opens
  that by its name in the header, graph or not).  Every refusal names the disk.
* **An explicit graph.**  ``-blockdev`` (JSON, never an option string) with node names from the
  disk's id: ``file-ID``/``disk-ID`` for the image, ``file-ID.bK``/``disk-ID.bK`` for the K-th
  backing file, each format node naming its ``backing`` node (the last ``null``), so QEMU opens
  nothing by the names in the headers.  The device is ``blk-ID`` at the disk's fixed PCI slot.

Everything here that touches files is blocking: the node runs it on worker threads.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._images import MissingImage, open_image
from ._spec import MAX_BACKING_DEPTH, DiskSpec, SpecError

QCOW2_MAGIC = b"QFI\xfb"
#: qcow2 header extension: the backing file's format
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_END = 0
#: qcow2 v3 incompatible feature bit: the guest's data lives in an external file the header names,
#: which QEMU opens by that name whatever the -blockdev graph says (the qcow2 driver's own open)
_INCOMPAT_DATA_FILE = 1 << 2
#: a backing file name longer than this is refused (QEMU's own limit is 1023)
_MAX_BACKING_NAME = 1023
#: how far into a header qsup reads extensions
_MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    size: int  # virtual size, bytes
    backing: str | None  # the backing file's name, as written
    backing_format: str | None


def read_qcow2(fd: int) -> Qcow2Header | None:
    """The qcow2 header at the start of ``fd``, or None when it is not a qcow2 image.

    Only what qsup needs: version, virtual size, backing file name and its format (header
    extension ``0xE2792ACA``).  Bounds are checked against the file, never trusted.
    """
    head = os.pread(fd, 104, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return None
    version, boff, bsize = struct.unpack(">IQI", head[4:20])
    (size,) = struct.unpack(">Q", head[24:32])
    if version not in (2, 3):
        raise ValueError(f"qcow2 version {version} is not supported")
    backing = None
    if boff:
        if not 0 < bsize <= _MAX_BACKING_NAME:
            raise ValueError(f"backing file name of {bsize} bytes")
        raw = os.pread(fd, bsize, boff)
        if len(raw) != bsize:
            raise ValueError("backing file name beyond the end of the image")
        try:
            backing = raw.decode()
        except UnicodeDecodeError:
            raise ValueError("backing file name is not UTF-8") from None
        if "\x00" in backing:
            raise ValueError("backing file name holds a NUL")
    header_len = 72
    if version == 3:
        if len(head) < 104:
            raise ValueError("truncated qcow2 v3 header")
        (header_len,) = struct.unpack(">I", head[100:104])
        if not 104 <= header_len <= _MAX_HEADER:
            raise ValueError(f"qcow2 header length {header_len}")
        (incompatible,) = struct.unpack(">Q", head[72:80])
        if incompatible & _INCOMPAT_DATA_FILE:
            raise ValueError("it names an external data file (QEMU would open it by that name): not supported")
    return Qcow2Header(version, size, backing, _backing_format(fd, header_len, boff) if backing else None)


def _backing_format(fd: int, offset: int, limit: int) -> str | None:
    """The backing-format header extension, read between the header and ``limit`` (the name)."""
    end = min(limit or _MAX_HEADER, _MAX_HEADER)
    while offset + 8 <= end:
        ext = os.pread(fd, 8, offset)
        if len(ext) < 8:
            return None
        kind, length = struct.unpack(">II", ext)
        if kind == _EXT_END:
            return None
        if offset + 8 + length > end:
            raise ValueError("header extension beyond the header")
        if kind == _EXT_BACKING_FORMAT:
            return os.pread(fd, length, offset + 8).decode("ascii", "replace")
        offset += 8 + ((length + 7) & ~7)
    return None


@dataclass
class ChainFile:
    """One opened file of a disk: the image (``depth`` 0) or a backing file."""

    path: str  # as opened: the image dir's resolved name joined with the rest
    fd: int
    format: str
    readonly: bool
    depth: int
    size: int  # virtual size (bytes)
    device: bool = False  # a block device (only a disk's own image, with allow_device_disks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class OpenDisk:
    """A disk's chain, opened: what QEMU gets as fdsets.  Closed by the caller once QEMU has them."""

    spec: DiskSpec
    files: list[ChainFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.files[0].size

    def close(self) -> None:
        for f in self.files:
            f.close()


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def open_disk(where: str, disk: DiskSpec, roots: Iterable[str | os.PathLike], *,
              allow_device: bool = False, for_qemu: bool = True) -> OpenDisk:
    """Open ``disk`` and its backing chain (see the module docstring); ``where``: its field
    (``disks[1]``), which every error names.  ``for_qemu=False``: a check (read-only, no O_DIRECT)."""
    roots = list(roots)
    field_ = f"{where}.path"
    ro = disk.readonly or not for_qemu
    # QEMU (9.1 on) hands out an fdset's fd only if its O_DIRECT matches what the node opens;
    # set after the header is read (O_DIRECT reads need aligned buffers)
    direct = _cache(disk.cache)["direct"] and for_qemu
    out = OpenDisk(disk)
    seen: set[tuple[int, int]] = set()
    path, fmt, named_by = disk.path, str(disk.format), None
    try:
        while True:
            depth = len(out.files)
            what = repr(path) if named_by is None else f"backing file {path!r} (named by {named_by!r})"
            flags = os.O_RDONLY if (ro or depth) else os.O_RDWR
            try:
                fd, st, opened = open_image("disk", path, roots, flags=flags,
                                            allow_device=allow_device and depth == 0, what=what)
            except MissingImage as e:
                raise SpecError(str(e), field_) from None
            except SpecError as e:
                raise SpecError(e.message, field_) from None
            device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            f = ChainFile(opened, fd, fmt, bool(depth) or ro, depth, 0, device)
            out.files.append(f)
            if (st.st_dev, st.st_ino) in seen:
                raise SpecError(f"{what}: the backing chain loops", field_)
            seen.add((st.st_dev, st.st_ino))
            try:
                header = read_qcow2(fd) if fmt == "qcow2" else None
            except (ValueError, OSError) as e:
                raise SpecError(f"{what}: not a usable qcow2 image: {e}", field_) from None
            if fmt == "qcow2" and header is None:
                raise SpecError(f"{what} is declared qcow2 but has no qcow2 header", field_)
            f.size = header.size if header else (_device_size(fd) if device else st.st_size)
            if direct:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError as e:
                    raise SpecError(f"{what}: its file system does not take O_DIRECT ({e.strerror}): "
                                    "cache \"none\" and \"directsync\" need it, use \"writeback\"",
                                    f"{where}.cache") from None
            if header is None or header.backing is None:
                return out
            name = header.backing
            if name.startswith("json:") or ":" in name.split("/", 1)[0]:
                raise SpecError(f"{what} names backing {name!r}: only a file in the image dirs "
                                "is allowed, no json: or protocol backing", field_)
            if header.backing_format not in ("raw", "qcow2"):
                raise SpecError(f"{what} names backing file {name!r} without its format "
                                f"({header.backing_format!r}; qsup never probes one: "
                                "create it with qemu-img -F raw|qcow2)", field_)
            if len(out.files) > MAX_BACKING_DEPTH:
                raise SpecError(f"{what}: backing chain deeper than {MAX_BACKING_DEPTH}", field_)
            # nothing below the image dir was followed to get here: ".." can be taken by name
            nxt = os.path.normpath(os.path.join(os.path.dirname(opened), name))
            path, fmt, named_by = nxt, str(header.backing_format), opened
    except BaseException:
        out.close()
        raise


def open_disks(disks: Iterable[DiskSpec], roots: Iterable[str | os.PathLike], *,
               allow_device: bool = False, for_qemu: bool = True) -> list[OpenDisk]:
    """Every disk of a spec, opened (all or none)."""
    roots = list(roots)
    out: list[OpenDisk] = []
    try:
        for i, d in enumerate(disks):
            out.append(open_disk(f"disks[{i}]", d, roots, allow_device=allow_device, for_qemu=for_qemu))
    except BaseException:
        for o in out:
            o.close()
        raise
    return out


def check_disks(disks: Iterable[DiskSpec], roots: Iterable[str | os.PathLike], *,
                allow_device: bool = False) -> list[int]:
    """The node's check at create: every chain opens by the rules (read-only here); the virtual sizes."""
    opened = open_disks(disks, roots, allow_device=allow_device, for_qemu=False)
    try:
        return [o.size for o in opened]
    finally:
        for o in opened:
            o.close()


# -- QEMU's side ------------------------------------------------------------------------------

def node_name(disk_id: str, depth: int = 0, kind: str = "disk") -> str:
    """``disk-ID`` (the format node the device uses), ``file-ID``; ``.bK`` for backing file K."""
    return f"{kind}-{disk_id}" + (f".b{depth}" if depth else "")


def device_id(disk_id: str) -> str:
    return f"blk-{disk_id}"


def _cache(mode: str) -> dict[str, bool]:
    return {"direct": mode in ("none", "directsync"), "no-flush": mode == "unsafe"}


def blockdevs(od: OpenDisk, fdsets: list[int]) -> list[dict[str, object]]:
    """The ``blockdev-add`` arguments of a disk, bottom of the chain first (each node names its
    backing, which must exist first).  ``fdsets[k]``: the fdset holding file ``k``'s fd."""
    d = od.spec
    out: list[dict[str, object]] = []
    for f, fdset in reversed(list(zip(od.files, fdsets))):
        cache = _cache(d.cache)
        file_node: dict[str, object] = {
            "driver": "host_device" if f.device else "file",
            "node-name": node_name(d.id, f.depth, "file"), "filename": f"/dev/fdset/{fdset}",
            "read-only": f.readonly, "cache": cache, "discard": d.discard if not f.readonly else "ignore",
        }
        fmt: dict[str, object] = {
            "driver": f.format, "node-name": node_name(d.id, f.depth), "file": file_node["node-name"],
            "read-only": f.readonly, "cache": cache, "discard": file_node["discard"],
        }
        if f.format == "qcow2":
            deeper = f.depth + 1 < len(od.files)
            fmt["backing"] = node_name(d.id, f.depth + 1) if deeper else None
        out += [file_node, fmt]
    return out


def device(d: DiskSpec) -> dict[str, object]:
    """The ``device_add`` arguments (``-device`` JSON) of a disk at its PCI slot."""
    assert d.pci_slot is not None, "slots are assigned at create (InstanceSpec.with_layout)"
    dev: dict[str, object] = {"driver": "virtio-blk-pci", "id": device_id(d.id), "drive": node_name(d.id),
                              "addr": f"{d.pci_slot:#x}", "write-cache": "off" if d.cache in
                              ("writethrough", "directsync") else "on"}
    if d.serial is not None:
        dev["serial"] = d.serial
    if d.boot is not None:
        dev["bootindex"] = d.boot
    if d.discard == "unmap" and not d.readonly:
        dev["discard"] = True
    return dev


def throttle(d: DiskSpec) -> dict[str, object] | None:
    """``block_set_io_throttle`` arguments when the disk has limits (else None)."""
    limits = d.io_limits()
    return {"id": throttle_id(d.id), **limits} if any(limits.values()) else None


def throttle_id(disk_id: str) -> str:
    """What ``block_set_io_throttle`` takes as ``id``: the virtio-blk device inside the PCI proxy
    ``blk-ID`` (QEMU: "Device does not have a block device backend" for the proxy's own id)."""
    return f"/machine/peripheral/{device_id(disk_id)}/virtio-backend"
