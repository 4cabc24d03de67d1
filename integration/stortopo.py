"""Two nodes with *local* disks at the same path: the storage-migration tests and benchmark.

migtopo.TwoNodes puts both daemons in network namespaces of one file system, so a path is the
same file on both nodes -- shared storage.  Here each daemon runs in a mount namespace of its
own (``unshare -m``) with a private directory bound over the common image dir ``images/``:
``/tmp/qsup-stor-X/images/g.raw`` is ``a/g.raw`` on node A and ``b/g.raw`` on node B, which is
what two hosts with local disks look like.  ``shared/`` is bound nowhere: the same files on
both nodes, declared ``shared_image_dirs``.  QEMU inherits its daemon's mount namespace (it
gets fds anyway).  From the host (the test), the nodes' images are ``a/...`` and ``b/...``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import migtopo
import topo
from migtopo import TwoNodes
from topo import GUEST, VENV_BIN, QsupDaemon

BLOCK = 4096
_MAGIC = 0x3154415050534944


class Storage:
    """The directories: ``images`` (the mount point), ``a``/``b`` (each node's own), ``shared``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="qsup-stor-"))
        self.base.chmod(0o700)
        self.images = self.base / "images"
        self.shared = self.base / "shared"
        self.a = self.base / "a"
        self.b = self.base / "b"
        for d in (self.images, self.shared, self.a, self.b):
            d.mkdir(mode=0o700)

    def node_dir(self, letter: str) -> Path:
        return self.a if letter == "a" else self.b

    def config(self) -> str:
        return (f"image_dirs = {json.dumps([str(GUEST), str(self.images), str(self.shared)])}\n"
                f"shared_image_dirs = {json.dumps([str(self.shared)])}\n")

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def make_image(path: Path, size: int, fill: int = 0) -> None:
    """A raw image, 0600 root; ``fill`` bytes of it random (the rest sparse)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        done = 0
        while done < fill:
            n = min(4 << 20, fill - done)
            os.pwrite(fd, os.urandom(n), done)
            done += n
        os.fchown(fd, 0, 0)
    finally:
        os.close(fd)


def host_disk_check(path: Path, start: int, count: int) -> dict:
    """diskpat's ``check`` from the host: every block of the region a whole diskpat block of its
    own number (header words: magic, block, seq and their inverses); the seq range seen.
    Run it with the guest's writer stopped (its QEMU gone or paused)."""
    bad, seqs = [], set()
    with open(path, "rb") as f:
        for b in range(start, start + count):
            f.seek(b * BLOCK)
            head = f.read(48)
            if len(head) < 48:
                bad.append(b)
                continue
            m, blk, seq, nm, nblk, nseq = struct.unpack("<6Q", head)
            mask = (1 << 64) - 1
            if m != _MAGIC or blk != b or nm != m ^ mask or nblk != blk ^ mask or nseq != seq ^ mask:
                bad.append(b)
            else:
                seqs.add(seq)
    return {"bad": bad, "seq_min": min(seqs, default=0), "seq_max": max(seqs, default=0)}


class MountedDaemon(QsupDaemon):
    """``qsup serve`` with a node's private image dir bound over the common one (see above)."""

    binds: dict[str, tuple[Path, Path]] = {}  # workdir name ("node-a") -> (private dir, mount point)

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        src, dst = self.binds[self.workdir.name]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed by kill()/terminate()
        mark = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" "$1" && exec "$2" serve --config "$3"',
             str(src), str(dst), str(VENV_BIN / "qsup"), str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=topo._env(self._env))
        try:
            self._wait_ready(mark, timeout)
        except BaseException:
            self.kill()
            raise


def start_nodes(workdir: Path, st: Storage, extra: str = "", *, tls: bool = False
                ) -> tuple[TwoNodes, QsupDaemon, QsupDaemon]:
    """The two-node topology with mounted daemons (migtopo's ``QsupDaemon`` swapped while they start)."""
    MountedDaemon.binds = {"node-a": (st.a, st.images), "node-b": (st.b, st.images)}
    t = TwoNodes(workdir)
    saved = migtopo.QsupDaemon
    migtopo.QsupDaemon = MountedDaemon  # type: ignore[misc]
    try:
        a, b = t.start_daemons(st.config() + extra, tls=tls)
    except BaseException:
        t.close()
        raise
    finally:
        migtopo.QsupDaemon = saved  # type: ignore[misc]
    return t, a, b


def qemu_leftovers(daemon: QsupDaemon, name: str) -> list[str]:
    """Block jobs, NBD client nodes and exports the guest's QEMU on ``daemon`` still has."""
    operator = daemon.cli_json("show", name)["qmp_operator"]
    out = []
    jobs = topo.qmp(operator, "query-jobs")
    out += [f"job {j['id']} ({j['status']})" for j in jobs]
    nodes = topo.qmp(operator, "query-named-block-nodes", {"flat": True})
    out += [f"node {n['node-name']}" for n in nodes if n["node-name"].startswith(("nbd-", "mirror"))]
    out += [f"export {e['id']}" for e in topo.qmp(operator, "query-block-exports")]
    return out
