"""Disks across a live migration: shared or local, declared; local ones copied over NBD.

Shared or local (docs/ARCHITECTURE.md, "Storage migration"):

* A node declares which of its image dirs are shared storage (config ``shared_image_dirs``).
  A disk beneath one is **shared**: the destination reopens it at the same path by the image
  rules (:func:`supervisor._disks.open_disk`) and checks that its format and virtual size are
  what the source sent (:func:`check_offer`).  Every other disk is **local**.
* The source says, per disk, what it holds (:class:`DiskOffer`: id, format, virtual size,
  shared) in the prepare request; the destination refuses a disk whose classification it does
  not share, naming ``disks[i]``.
* A migration never opens a local disk's path on the destination as an existing image: the
  destination creates the target itself (:func:`create_targets`: ``O_CREAT|O_EXCL`` beneath the
  image dir, 0600 root, an existing file refused, free space checked; raw: ``ftruncate``;
  qcow2: an empty qcow2 that qsup writes itself, :func:`write_empty_qcow2`), and deletes only
  what it created (:func:`remove_created`), checked by device and inode.

Local-disk live migration, the QMP side (QEMU facts in ../DESIGN: "Local-disk live migration"):

* destination: ``nbd-server-start`` on its migration address (with the migration's
  ``tls-creds-psk`` object when the node has TLS) and ``block-export-add {type: nbd,
  node-name: disk-ID, writable: true}`` per local disk (:func:`export_targets`); it stops the
  server before ``cont`` (:func:`stop_exports`);
* source: ``blockdev-add`` an ``nbd`` client node ``nbd-ID`` per disk, ``blockdev-mirror
  {sync: full, copy-mode: write-blocking}`` (job ``mirror-ID``, ``auto-dismiss: false`` so
  its end state can be read), waits for every job to be ready (:func:`mirror_status`), and at
  ``pre-switchover`` cancels the ready jobs -- completion *without pivot*: the source image
  stays the guest's -- and deletes the client nodes (:func:`finish_mirrors`).  On any failure
  :func:`abandon_mirrors` force-cancels whatever job and node is left.

Everything that touches files is blocking: the node runs it on worker threads.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._disks import ChainFile, OpenDisk, _cache, node_name, open_disk
from ._images import locate, open_beneath
from ._spec import DISK_ID_RE, MAX_DISKS, DiskSpec, InstanceSpec, SpecError

log = structlog.get_logger("qsup.storage")

#: the largest virtual size qsup creates a target image of (64 TiB)
MAX_TARGET_SIZE = 64 << 40
#: room kept free beyond the virtual size of each target (qcow2 metadata, the file system's own)
SPACE_MARGIN = 16 << 20
QCOW2_CLUSTER_BITS = 16


def is_shared(path: str, shared_dirs: Iterable[str | os.PathLike]) -> bool:
    """Does ``path`` lie beneath one of the node's ``shared_image_dirs``?"""
    return locate(path, list(shared_dirs)) is not None


def local_disks(spec: InstanceSpec, shared_dirs: Iterable[str | os.PathLike]) -> list[tuple[int, DiskSpec]]:
    """``(index, disk)`` of every local disk of ``spec`` (not beneath a shared image dir)."""
    shared = list(shared_dirs)
    return [(i, d) for i, d in enumerate(spec.disks) if not is_shared(d.path, shared)]


class DiskOffer(BaseModel):
    """What the source holds of one disk, sent in the prepare request (checked as hostile)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: str = Field(pattern=DISK_ID_RE.pattern[:-2] + "$")
    format: Literal["raw", "qcow2"]
    size: int = Field(ge=1, le=MAX_TARGET_SIZE)  # virtual size, bytes
    shared: bool


def parse_offers(body: object) -> list[DiskOffer]:
    """The prepare request's ``disks`` (a list of :class:`DiskOffer`), SpecError naming ``disks[i]``."""
    if not isinstance(body, list) or len(body) > MAX_DISKS:
        raise SpecError(f"must be a list of at most {MAX_DISKS} disk offers", "disks")
    out = []
    for i, item in enumerate(body):
        try:
            out.append(DiskOffer.model_validate(item))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise SpecError(f"invalid disk offer: {err['msg']} (at {loc or 'the offer'})", f"disks[{i}]") from None
    return out


def check_offer(spec: InstanceSpec, offers: Sequence[DiskOffer], shared_dirs: Iterable[str | os.PathLike]) -> None:
    """Destination: the source's offer names exactly the spec's disks, in order, with their
    declared format, and classifies each as this node does.  SpecError naming ``disks[i]``."""
    shared = list(shared_dirs)
    if len(offers) != len(spec.disks):
        raise SpecError(f"the source offered {len(offers)} disks for a spec of {len(spec.disks)}", "disks")
    for i, (d, o) in enumerate(zip(spec.disks, offers, strict=True)):
        where = f"disks[{i}]"
        if o.id != d.id or o.format != d.format:
            raise SpecError(f"the source offered disk {o.id!r} ({o.format}), the spec says {d.id!r} "
                            f"({d.format})", where)
        here = is_shared(d.path, shared)
        if o.shared != here:
            mine = "shared (beneath shared_image_dirs)" if here else "local"
            theirs = "shared" if o.shared else "local"
            raise SpecError(f"{d.path!r} is {theirs} on the source but {mine} on this node: "
                            "both nodes must declare the same shared_image_dirs", where)


def check_shared(where: str, disk: DiskSpec, offer: DiskOffer, roots: Iterable[str | os.PathLike], *,
                 allow_device: bool = False) -> None:
    """Destination, a shared disk: reopen it by the image rules (read-only: a check) and compare
    its virtual size with the source's (the format is checked by opening it as declared)."""
    od = open_disk(where, disk, roots, allow_device=allow_device, for_qemu=False)
    try:
        if od.size != offer.size:
            raise SpecError(f"{disk.path!r} is {od.size} bytes here, {offer.size} on the source: not the "
                            "same shared image", f"{where}.path")
    finally:
        od.close()


# -- target images --------------------------------------------------------------------------

@dataclass(frozen=True)
class Created:
    """An image a migration destination created: deleted only while it is still that file."""

    disk_id: str
    path: str  # as created: the image dir's resolved name joined with the rest
    dev: int
    ino: int

    def record(self) -> dict[str, object]:
        return {"disk": self.disk_id, "path": self.path, "dev": self.dev, "ino": self.ino}

    @classmethod
    def from_record(cls, rec: object) -> "Created | None":
        if not isinstance(rec, dict):
            return None
        d, p, dev, ino = rec.get("disk"), rec.get("path"), rec.get("dev"), rec.get("ino")
        if isinstance(d, str) and isinstance(p, str) and isinstance(dev, int) and isinstance(ino, int):
            return cls(d, p, dev, ino)
        return None


def qcow2_layout(size: int, cluster_bits: int = QCOW2_CLUSTER_BITS) -> tuple[int, int, int]:
    """``(l1_size, l1_clusters, total_clusters)`` of an empty qcow2 of ``size`` bytes: header,
    refcount table, one refcount block, the L1 table (as ``qemu-img create`` lays it out)."""
    cs = 1 << cluster_bits
    per_l2 = cs // 8
    l1_size = -(-size // (cs * per_l2))
    l1_clusters = max(1, -(-(l1_size * 8) // cs))
    total = 3 + l1_clusters
    if total > cs // 2:  # one 16-bit refcount block covers cs/2 clusters
        raise ValueError(f"{size} bytes is too large for one refcount block")
    return l1_size, l1_clusters, total


def write_empty_qcow2(fd: int, size: int, cluster_bits: int = QCOW2_CLUSTER_BITS) -> None:
    """An empty qcow2 v3 image of virtual ``size`` bytes, no backing file, written on ``fd``.

    qsup writes it itself rather than run ``qemu-img`` as root: cluster 0 the header (v3,
    refcount order 4, header length 104, the end-of-extensions mark), cluster 1 the refcount
    table (one entry), cluster 2 its refcount block (every used cluster: 1), cluster 3.. the
    L1 table (all zero: nothing allocated).
    """
    cs = 1 << cluster_bits
    l1_size, l1_clusters, total = qcow2_layout(size, cluster_bits)
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, cluster_bits, size, 0, l1_size, 3 * cs, 1 * cs, 1, 0, 0,
        0, 0, 0, 4, 104)
    assert len(header) == 104
    os.ftruncate(fd, total * cs)
    os.pwrite(fd, header + b"\0" * 8, 0)  # then the end of the header extensions
    os.pwrite(fd, struct.pack(">Q", 2 * cs), 1 * cs)
    os.pwrite(fd, struct.pack(f">{total}H", *([1] * total)), 2 * cs)
    del l1_clusters  # the L1 table is the zeros ftruncate left
    os.fsync(fd)


def create_targets(disks: Sequence[tuple[int, DiskSpec, int]], roots: Iterable[str | os.PathLike]
                   ) -> tuple[list[OpenDisk], list[Created]]:
    """Destination: create each local disk's target image, all or none.

    ``disks``: ``(index in the spec, disk, virtual size)``.  Each at the disk's path, beneath its
    image dir (no symlink below it, no ``..`` leaving it), ``O_CREAT|O_EXCL`` (a file already
    there is refused: it is never opened as an image), mode 0600; refused when the file system
    has less free space than the virtual sizes (+ a margin) of the targets it gets.  Raw:
    ``ftruncate`` to the virtual size (sparse); qcow2: an empty qcow2 of that size (the mirror
    flattens any backing chain).  Returns the opened disks (their fds for QEMU) and what was
    created (for :func:`remove_created`).  SpecError naming ``disks[i]``.
    """
    roots = list(roots)
    parents: list[tuple[str, int, str, str]] = []  # (where, parent dir fd, name, path as created)
    opened: list[OpenDisk] = []
    created: list[Created] = []
    try:
        need: dict[int, int] = {}
        for i, d, size in disks:
            where = f"disks[{i}]"
            found = locate(d.path, roots)
            if found is None:
                raise SpecError(f"{d.path!r} is not inside image_dirs", f"{where}.path")
            root, rel = found
            parent_rel, _, name = rel.rpartition("/")
            if not name or name in (".", ".."):
                raise SpecError(f"{d.path!r} names no file", f"{where}.path")
            if not 1 <= size <= MAX_TARGET_SIZE:
                raise SpecError(f"virtual size {size} out of range", where)
            try:
                pfd = open_beneath(root, parent_rel, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise SpecError(f"{d.path!r}: its directory: {e.strerror}", f"{where}.path") from None
            real = os.path.realpath(root)
            parents.append((where, pfd, name, os.path.normpath(os.path.join(real, rel))))
            st = os.fstat(pfd)
            vfs = os.fstatvfs(pfd)
            need[st.st_dev] = need.get(st.st_dev, 0) + size + SPACE_MARGIN
            free = vfs.f_bavail * vfs.f_frsize
            if need[st.st_dev] > free:
                raise SpecError(f"not enough space for {d.path!r}: its {size} bytes (with the other "
                                f"targets on that file system, {need[st.st_dev]}) exceed the {free} "
                                "bytes free there", where)
        for (i, d, size), (where, pfd, name, path) in zip(disks, parents, strict=True):
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=pfd)
            except FileExistsError:
                raise SpecError(f"{d.path!r} already exists on this node: a local disk's target is "
                                "created by the migration, never an existing file (remove it, or "
                                "declare its directory in shared_image_dirs on both nodes)", f"{where}.path") from None
            except OSError as e:
                raise SpecError(f"{d.path!r}: cannot create: {e.strerror}", f"{where}.path") from None
            st = os.fstat(fd)
            c = Created(d.id, path, st.st_dev, st.st_ino)
            created.append(c)
            od = OpenDisk(d, [ChainFile(path, fd, str(d.format), False, 0, size)])
            opened.append(od)
            try:
                os.fchmod(fd, 0o600)
                if os.geteuid() == 0:
                    os.fchown(fd, 0, 0)
                if d.format == "qcow2":
                    write_empty_qcow2(fd, size)
                else:
                    os.ftruncate(fd, size)
            except OSError as e:
                raise SpecError(f"{d.path!r}: cannot write the target image: {e.strerror}", where) from None
            if _cache(d.cache)["direct"]:  # QEMU hands out an fdset's fd only with the O_DIRECT it opens with
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError as e:
                    raise SpecError(f"{d.path!r}: its file system does not take O_DIRECT ({e.strerror}): "
                                    "choose a cache mode without it", f"{where}.cache") from None
        return opened, created
    except BaseException:
        for od in opened:
            od.close()
        remove_created(created)
        raise
    finally:
        for _, pfd, _, _ in parents:
            os.close(pfd)


def remove_created(created: Iterable[Created]) -> list[str]:
    """Delete the images a destination created -- each only while its path still names the very
    file created (same device and inode).  Returns what could not be removed."""
    left = []
    for c in created:
        parent, name = os.path.split(c.path)
        try:
            dfd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # its directory is gone: so is the file
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (c.dev, c.ino):
                os.unlink(name, dir_fd=dfd)
                log.info("target image removed", path=c.path)
            else:
                log.warning("target image replaced since it was created: left alone", path=c.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append(f"{c.path}: {e.strerror}")
        finally:
            os.close(dfd)
    return left


# -- QMP ----------------------------------------------------------------------------------------

def nbd_node(disk_id: str) -> str:
    """The source's NBD client node for a disk's target."""
    return f"nbd-{disk_id}"


def job_id(disk_id: str) -> str:
    return f"mirror-{disk_id}"


def export_id(disk_id: str) -> str:
    return f"export-{disk_id}"


def inet(host: str, port: int) -> dict[str, object]:
    return {"type": "inet", "host": host, "port": str(port)}


async def export_targets(qmp, disk_ids: Sequence[str], host: str, port: int, tls_creds: str | None) -> None:
    """Destination: the NBD server on ``host:port`` and one writable export per local disk
    (export name: the disk id).  With ``tls_creds`` only a client holding the migration's key
    gets in."""
    args: dict[str, object] = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
    if tls_creds:
        args["tls-creds"] = tls_creds
    await qmp.execute("nbd-server-start", args)
    for d in disk_ids:
        await qmp.execute("block-export-add", {"type": "nbd", "id": export_id(d), "node-name": node_name(d),
                                               "name": d, "writable": True})


async def stop_exports(qmp) -> None:
    """Destination: stop the NBD server (its exports go with it); nothing running is an answer too."""
    import qmp_glue

    try:
        await qmp.execute("nbd-server-stop", timeout=5)
    except qmp_glue.QMPError as e:
        if "not running" not in str(e):
            raise


async def start_mirrors(qmp, disk_ids: Sequence[str], host: str, port: int, tls_creds: str | None,
                        added: list[str], jobs: list[str]) -> None:
    """Source: an NBD client node per target, then the mirror job; ``added``/``jobs`` grow as
    they are made, so a failure half-way leaves the caller knowing what to abandon."""
    for d in disk_ids:
        node: dict[str, object] = {"driver": "nbd", "node-name": nbd_node(d), "server": inet(host, port),
                                   "export": d}
        if tls_creds:
            node["tls-creds"] = tls_creds
        await qmp.execute("blockdev-add", node)
        added.append(d)
    for d in disk_ids:
        await qmp.execute("blockdev-mirror", {"job-id": job_id(d), "device": node_name(d), "target": nbd_node(d),
                                              "sync": "full", "copy-mode": "write-blocking",
                                              "auto-finalize": True, "auto-dismiss": False})
        jobs.append(d)


@dataclass
class MirrorStatus:
    """The mirror jobs as ``query-jobs`` shows them."""

    done: int = 0  # bytes copied (all jobs)
    total: int = 0
    ready: bool = False  # every job is ready (source and target in sync, kept so)
    failed: str | None = None  # a job that ended or failed, and why

    def view(self) -> dict[str, object]:
        return {"copied": self.done, "total": self.total, "ready": self.ready}


async def mirror_status(qmp, disk_ids: Sequence[str]) -> MirrorStatus:
    jobs = await qmp.execute("query-jobs")
    by_id = {j.get("id"): j for j in jobs if isinstance(j, dict)} if isinstance(jobs, list) else {}
    st = MirrorStatus(ready=True)
    for d in disk_ids:
        j = by_id.get(job_id(d))
        if j is None:
            st.failed = st.failed or f"the mirror of disk {d!r} is gone"
            st.ready = False
            continue
        done, total = j.get("current-progress"), j.get("total-progress")
        st.done += done if isinstance(done, int) else 0
        st.total += total if isinstance(total, int) else 0
        status = j.get("status")
        if isinstance(j.get("error"), str) or status in ("aborting", "concluded", "null"):
            err = j.get("error")
            st.failed = st.failed or f"the mirror of disk {d!r} failed: {err if isinstance(err, str) else status}"
        if status != "ready":
            st.ready = False
    return st


async def finish_mirrors(qmp, disk_ids: Sequence[str], timeout: float = 10.0) -> None:
    """Source, at ``pre-switchover`` (the guest is paused, every mirror ready): cancel each job
    -- a ready mirror cancelled completes *without pivot*, the target a copy of the source as of
    now and the source image still the guest's -- wait until each concluded without error,
    dismiss it, delete the NBD client nodes.  Raises RuntimeError when a job did not end clean."""
    import trio

    for d in disk_ids:
        await qmp.execute("block-job-cancel", {"device": job_id(d)})
    pending = set(disk_ids)
    errors = []
    with trio.move_on_after(timeout):
        while pending:
            jobs = await qmp.execute("query-jobs")
            by_id = {j.get("id"): j for j in jobs if isinstance(j, dict)} if isinstance(jobs, list) else {}
            for d in sorted(pending):
                j = by_id.get(job_id(d))
                if j is None or j.get("status") == "concluded":
                    pending.discard(d)
                    if j is not None and isinstance(j.get("error"), str):
                        errors.append(f"disk {d!r}: {j['error']}")
            if pending:
                await trio.sleep(0.005)
    if pending:
        raise RuntimeError(f"the mirrors of {sorted(pending)} did not end within {timeout:g}s")
    for d in disk_ids:
        await qmp.execute("job-dismiss", {"id": job_id(d)})
    for d in disk_ids:
        await qmp.execute("blockdev-del", {"node-name": nbd_node(d)})
    if errors:
        raise RuntimeError("the mirrors did not end in sync: " + "; ".join(errors))


async def abandon_mirrors(qmp, disk_ids: Sequence[str], timeout: float = 15.0) -> list[str]:
    """Source, on any failure: force-cancel every mirror job left, dismiss it, delete every NBD
    client node left.  Best effort, each step on its own; returns what could not be removed."""
    import trio

    import qmp_glue

    errs = (qmp_glue.QMPError, qmp_glue.QMPConnectionLost, trio.TooSlowError)
    left: list[str] = []
    try:
        jobs = await qmp.execute("query-jobs", timeout=5)
    except errs:
        jobs = []
    mine = {job_id(d) for d in disk_ids}
    present: set[str] = {str(j.get("id")) for j in jobs if isinstance(j, dict)} & mine \
        if isinstance(jobs, list) else set()
    for jid in sorted(present):
        try:
            await qmp.execute("block-job-cancel", {"device": jid, "force": True}, timeout=5)
        except errs as e:
            log.info("mirror cancel", job=jid, error=str(e))
    with trio.move_on_after(timeout):
        while present:
            try:
                jobs = await qmp.execute("query-jobs", timeout=5)
            except errs:
                break
            now = {j.get("id"): j.get("status") for j in jobs if isinstance(j, dict)} if isinstance(jobs, list) else {}
            for jid in sorted(present):
                if jid not in now:
                    present.discard(jid)
                elif now[jid] == "concluded":
                    try:
                        await qmp.execute("job-dismiss", {"id": jid}, timeout=5)
                    except errs as e:
                        log.info("mirror dismiss", job=jid, error=str(e))
                    present.discard(jid)
            if present:
                await trio.sleep(0.05)
    left += [f"job {j}" for j in sorted(present)]
    for d in disk_ids:
        try:
            await qmp.execute("blockdev-del", {"node-name": nbd_node(d)}, timeout=5)
        except qmp_glue.QMPError as e:
            if "not found" not in str(e).lower() and "cannot find" not in str(e).lower():
                left.append(f"node {nbd_node(d)}: {e}")
        except errs[1:] as e:
            left.append(f"node {nbd_node(d)}: {e}")
    return left


# -- what a migration of a spec's disks needs -------------------------------------------------

#: local-disk live migration over NBD is there (False: every local disk refuses the migration)
LOCAL_DISK_MIGRATION = True


def disk_refusal(spec: InstanceSpec, shared_dirs: Iterable[str | os.PathLike], *,
                 postcopy: bool) -> tuple[str, str] | None:
    """Why a live migration of ``spec`` is refused for its disks: ``(message, field)``, or None."""
    local = local_disks(spec, shared_dirs)
    if not local:
        return None
    i, d = local[0]
    if not LOCAL_DISK_MIGRATION:
        return (f"disk {d.id!r} ({d.path!r}) is local (not beneath shared_image_dirs) and this node "
                "cannot copy a local disk yet: declare its directory shared on both nodes if it is "
                "shared storage", f"disks[{i}]")
    if postcopy:
        return (f"disk {d.id!r} is local: it is copied by a mirror that must be in sync at the "
                "switchover, which post-copy does not have; migrate without postcopy", "postcopy")
    return None


async def offers(qmp, spec: InstanceSpec, shared_dirs: Iterable[str | os.PathLike]) -> list[dict[str, object]]:
    """Source: what it holds of each disk (:class:`DiskOffer`), the virtual sizes from QEMU."""
    shared = list(shared_dirs)
    if not spec.disks:
        return []
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    sizes: dict[str, int] = {}
    for n in nodes if isinstance(nodes, list) else []:
        image = n.get("image") if isinstance(n, dict) else None
        if isinstance(image, dict) and isinstance(image.get("virtual-size"), int):
            sizes[str(n.get("node-name"))] = image["virtual-size"]
    out: list[dict[str, object]] = []
    for d in spec.disks:
        size = sizes.get(node_name(d.id))
        if size is None:
            raise RuntimeError(f"QEMU shows no block node {node_name(d.id)!r}")
        out.append({"id": d.id, "format": str(d.format), "size": size, "shared": is_shared(d.path, shared)})
    return out


@dataclass
class Targets:
    """A migration destination's disks: the local disks' new target images (opened, for QEMU's
    fdsets) and what was created (deleted again unless the guest was activated here)."""

    opened: dict[str, OpenDisk]  # disk id -> its target, opened read-write
    created: list[Created]

    def __post_init__(self) -> None:
        #: the ids of the local disks, exported over NBD to the source
        self.local = list(self.opened)

    def take(self, disks: Sequence[DiskSpec], roots: Iterable[str | os.PathLike], *,
             allow_device: bool = False) -> list[OpenDisk]:
        """The launch: every disk of the spec, in order -- a local one is its created target
        (handed over once: the caller closes it after the spawn), a shared one reopened."""
        roots = list(roots)
        out: list[OpenDisk] = []
        try:
            for i, d in enumerate(disks):
                od = self.opened.pop(d.id, None)
                out.append(od if od is not None else open_disk(f"disks[{i}]", d, roots, allow_device=allow_device))
        except BaseException:
            for od in out:
                od.close()
            raise
        return out

    def close(self) -> None:
        """Our descriptors (QEMU holds its own copies once it runs)."""
        for od in self.opened.values():
            od.close()

    def discard(self) -> list[str]:
        """Close and delete what was created; what could not be removed."""
        self.close()
        left = remove_created(self.created)
        self.created = []
        return left


def prepare_disks(spec: InstanceSpec, offers: Sequence[DiskOffer], cfg) -> Targets:
    """Destination (a worker thread): shared disks reopened and checked against the offer, local
    disks' targets created (:func:`create_targets`).  SpecError naming ``disks[i]``."""
    local: list[tuple[int, DiskSpec, int]] = []
    for i, (d, o) in enumerate(zip(spec.disks, offers, strict=True)):
        if o.shared:
            check_shared(f"disks[{i}]", d, o, cfg.image_dirs, allow_device=cfg.allow_device_disks)
        else:
            local.append((i, d, o.size))
    if local and not LOCAL_DISK_MIGRATION:
        i, d, _ = local[0]
        raise SpecError(f"disk {d.id!r} is local and this node cannot receive a local disk yet", f"disks[{i}]")
    opened, created = create_targets(local, cfg.image_dirs)
    return Targets({od.spec.id: od for od in opened}, created)
