"""Where things live on disk, and how they are written.

Everything the supervisor must find again after a restart lives under the
*state dir*; sockets live under the *run dir*.  Two rules hold everywhere:

* Paths are built only from validated instance names and checked to stay
  inside their root (:func:`inside`), so a name can never escape.
* Records are written atomically (temp file in the same directory, fsync,
  rename, fsync the directory) with mode 0600 in 0700 directories, so a
  crash leaves either the old or the new record, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def inside(root: Path, *parts: str) -> Path:
    """Join ``parts`` onto ``root``, refusing anything that leaves it."""
    root = Path(os.path.abspath(root))
    p = Path(os.path.abspath(root.joinpath(*parts)))
    if p == root or root not in p.parents:
        raise ValueError(f"path {p} escapes {root}")
    return p


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> object:
    return json.loads(path.read_bytes())


class Layout:
    """The on-disk layout of one node.

    ``<state_dir>/instances/<name>/record.json``  runtime record (pid, nics/taps)
    ``<state_dir>/instances/<name>/netconf.journal``  netconf journal
    ``<state_dir>/logs/<name>.log`` / ``.console``  qemu stderr / serial console
    ``<run_dir>/<name>/qmp.sock``, ``qmp-operator.sock``  monitors; ``console.sock`` the serial console;
    ``stderr.fifo`` qemu's stderr on its way into the capped ``.log``
    """

    def __init__(self, state_dir: str | Path, run_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir)

    def prepare(self) -> None:
        ensure_dir(self.state_dir)
        ensure_dir(self.state_dir / "instances")
        ensure_dir(self.state_dir / "logs", 0o750)
        ensure_dir(self.run_dir, 0o755)

    def instance_dir(self, name: str) -> Path:
        return inside(self.state_dir / "instances", name)

    def record_path(self, name: str) -> Path:
        return self.instance_dir(name) / "record.json"

    def journal_path(self, name: str) -> Path:
        return self.instance_dir(name) / "netconf.journal"

    def instance_run_dir(self, name: str) -> Path:
        return inside(self.run_dir, name)

    def qmp_path(self, name: str) -> Path:
        return self.instance_run_dir(name) / "qmp.sock"

    def operator_qmp_path(self, name: str) -> Path:
        return self.instance_run_dir(name) / "qmp-operator.sock"

    def console_socket_path(self, name: str) -> Path:
        """QEMU's serial console; whoever connects types on it, so only qsup may (run dir 0700)."""
        return self.instance_run_dir(name) / "console.sock"

    def log_fifo_path(self, name: str) -> Path:
        """The FIFO QEMU's stdout/stderr go through; qsup copies it into :meth:`log_path`, capped."""
        return self.instance_run_dir(name) / "stderr.fifo"

    def log_path(self, name: str) -> Path:
        return inside(self.state_dir / "logs", f"{name}.log")

    def console_path(self, name: str) -> Path:
        return inside(self.state_dir / "logs", f"{name}.console")

    def recorded_instances(self) -> list[str]:
        d = self.state_dir / "instances"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "record.json").exists())

    def remove_instance(self, name: str) -> None:
        """Drop the record, the journal and the run dir of ``name``."""
        for p in (self.instance_dir(name), self.instance_run_dir(name)):
            shutil.rmtree(p, ignore_errors=True)
